"""The projection study (Chiang et al. §3, Appendices A.2 and E; docs/projection.md): is the softmax bottleneck why
kNN-LM beats the LM? Per token, z* = argmin_z KL[f(z) ‖ p_knnlm] through the LM's own frozen last layers (targets
``f_out``, ``f_norm``, ``fg``, ``fg_to_y``), solved per position with Adam from the LM's own hidden state."""
