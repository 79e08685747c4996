"""The deployed inference path, shared by evaluation, prediction, export and serving.

- :mod:`.onnx`: the one ONNX exporter and the one onnxruntime session builder;
- :mod:`.parity`: the one numerical check that an optimised or exported path matches eager PyTorch;
- :mod:`.tta`: the padding rule, sliding windows and test-time augmentation (logits at input size);
- :mod:`.predictor`: :class:`~.predictor.Predictor`, which picks the backend and turns images into masks.
"""
