"""Launchers: allocate outputs, pick block sizes and launch kernels. No autograd here."""
