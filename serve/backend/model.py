"""Triton's entry point: ``model.py`` of every python-backend version.

Triton imports a version folder as a package (``<version>.model``), so the files of this
package, copied whole into the version, import each other as they do in the repository.
Which model the version is comes from its config: a model whose input is encoded images
(``TYPE_STRING``) is the preprocess model, one whose input is pixels the classifier. The
other model's module is never imported (the preprocess model's stubs load no ONNX
Runtime)."""

import json


class TritonPythonModel:
    """Python-backend entry points, handed to the model this version is."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        if config["input"][0]["data_type"] == "TYPE_STRING":
            from .preprocess_model import PreprocessModel

            self.model = PreprocessModel()
        else:
            from .classifier_model import ClassifierModel

            self.model = ClassifierModel()
        self.model.initialize(args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
