"""Public functional ops: autograd Functions and the per-call backend decision (see silmm_fast._backend)."""
