"""One runner per runtime, one shape for all: ``runner.logits(pixels) -> [N, C] array``,
with the stage it runs (:class:`~export.checks.stages.StageName`) and what it needs
given when it is made (a checkpoint, a model file, a plan, a server).

``runner.py`` the interface; ``pytorch.py`` (the checkpoint in FP32 or FP16),
``onnxruntime.py`` (an ONNX file on CPU), ``tensorrt.py`` (a plan, GPU hosts),
``triton.py`` (a served model over HTTP, gRPC or as raw images, and the scratch server
the export's Triton stages run on). The export, replay and the batch sweep run stages
only through these. Adding a runtime is one module here, one StageName member and its
test. Stands on export.checks and export.formats."""
