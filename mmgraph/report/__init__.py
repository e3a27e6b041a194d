"""What a person reads: the compile dumps (``dump``), MLIR and ONNX (``formats``), drawings
(``draw``), ``report.html`` (``html``) and how a step fits (``fit``)."""
