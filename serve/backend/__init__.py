"""What runs inside Triton's python backend, self-contained: the standard library, NumPy,
Pillow and ONNX Runtime, and no other module of this project. ``export`` copies the
package whole into each python-backend version (Triton imports the version folder as a
package, so ``model.py`` and its siblings import each other relatively, as they do here);
``serve``, ``train`` and ``export`` import it as the one implementation:

- ``errors``: the project's error root (TrainServeError, UserError, UsageError);
- ``image_scan``: an image's structure and decode work, before any decoder;
- ``preprocess``: bounded decoding and the eval geometry (client, data loader, server);
- ``isolated_decode``: every server-side decode out of process, the slow lane;
- ``model``: Triton's entry point, which runs ``classifier_model`` (ONNX Runtime on
  pixels) or ``preprocess_model`` (encoded images to pixels) by the version's config.

Nothing here is imported by this ``__init__``: in a version folder it is the package's
first file Triton runs."""
