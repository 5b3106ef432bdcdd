"""The PyTorch executor: custom ops, caches, generation, and the backends behind nextq.load."""
