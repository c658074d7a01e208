"""The peak-learning-rate grids every training comparison sweeps (train_lm, train_mlp_jax).

Muon (match_rms_adamw) and ASGO/DASGO (update RMS 0.2) share one lr scale; DASGO's grid sits one
step lower because its quick-sweep optimum was at 1e-3, the bottom of the shared grid.
"""

LR_GRIDS = {
    "adamw": [3e-4, 1e-3, 3e-3, 1e-2],
    "muon": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    "asgo_tau1": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    "asgo_tau10": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    "dasgo": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
}
