"""Planning a run: its parameters, FLOPs, memory, time and disk, before it is launched (`semanticist-fast plan`)."""
