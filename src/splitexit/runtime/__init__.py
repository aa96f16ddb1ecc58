"""What runs a deployed exit program, with numpy and ONNX Runtime alone (no PyTorch).

- :mod:`~splitexit.runtime.arrays`: the array operations of the loop and the policies.
- :mod:`~splitexit.runtime.loop`: the one early-exit loop every runtime shares.
- :mod:`~splitexit.runtime.ort`: ONNX Runtime sessions and the exit program over them.
- :mod:`~splitexit.runtime.bundle`: reading and checking a deployment bundle.

Nothing in this package imports torch; torch tensors are accepted where a caller has them.
"""
