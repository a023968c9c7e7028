"""Images in, detections out: the I/O contract shared by ``attn-export serve`` and the Triton model,
image decoding and letterboxing, box post-processing (NMS), loading a served model, and the one
detection pipeline (decode within a pixel budget -> batch -> post-process -> answer) that every
protocol runs.
"""
