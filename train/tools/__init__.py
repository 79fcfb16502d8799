"""Research commands over the library: time-to-accuracy and training speed
(``python -m train bench``), k-fold selection of recipe settings (``cv``), the linear
probe's cross-validation (``probe-cv``) and the Inception-module experiment (``modules``)."""
