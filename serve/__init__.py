"""``attn-export serve``: the FastAPI service. The admission door, the micro-batcher, thin routes for
``/detect``, the Open Inference Protocol over HTTP and gRPC, health, metrics and the web page, all
over the one detection pipeline of :mod:`attn_export.detection`."""
