"""Deployment: the model's towers as ONNX graphs and TensorRT engines. The runtimes that run
those graphs for the batch jobs and Serve are clip_platform.encode.backends.

* `onnx_export`    ONNX graphs with a dynamic batch and text length, checked against PyTorch
                   (jobs/export_onnx.py), and the cache of graphs by checkpoint fingerprint
* `tensorrt_build` TensorRT engines from those graphs (jobs/export_tensorrt.py)
"""
