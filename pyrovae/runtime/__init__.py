"""What a run needs from its process and machine: checkpoints, torch.distributed, signal handling and
allocator tuning."""
