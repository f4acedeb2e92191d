"""The LoKr network and its file: which modules it wraps and with what factors (`lokr`: the
LyCORIS preset, `create_lokr`, `--init-lokr`, save and load), the tensor names other tools read
(`naming`: diffusers ↔ sd-scripts), the file's metadata (`metadata`), and the two commands
that use a finished file, ``python -m trainers.lokr merge`` (`merge`) and ``convert``
(`convert`).

Imports: lycoris, torch, hakubooru, `trainers.lokr.sdxl` and the leaf modules
(`safetensors_file`). Never `data`, `observe` or the loop.
"""
