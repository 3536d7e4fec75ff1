"""Deployment: the model's towers as ONNX graphs and TensorRT engines, and the runtimes that
run them for the batch jobs and Serve.

* `onnx_export`    ONNX graphs with a dynamic batch and text length, checked against PyTorch
                   (jobs/export_onnx.py), and the cache of graphs by checkpoint fingerprint
* `tensorrt_build` TensorRT engines from those graphs (jobs/export_tensorrt.py)
* `runtimes`       --backend: ONNX Runtime and OpenVINO sessions over the cached graphs, and
                   what `auto` picks for a device and precision
"""
