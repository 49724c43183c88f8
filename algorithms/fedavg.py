"""FedAvg — McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017.

Client k runs E epochs of SGD on its data from the global weights w_t; the server sets
w_{t+1} = Σ_k (n_k / n) w_k^{t+1} over the sampled clients (Algorithm 1).

That is exactly what `raysim.algorithm.Algorithm` does with none of its hooks overridden: the
loss is the task's (cross-entropy, or the segmentation loss on segmentation tasks) and the
aggregate is the sample-weighted mean. The other methods extend this class and override only
the hooks that differ.

Privacy (`privacy`, docs/privacy.md): central DP (DP-FedAvg) clips each client's delta to C
and noises the sum once; local DP uploads w + clip(Δ, C) + N(0, σ²C²) with sample count 1,
which protects the client's whole dataset but not that it took part, and swamps the model with
per-coordinate noise unless many clients are averaged.
"""

from __future__ import annotations

from raysim.algorithm import Algorithm


class FedAvg(Algorithm):
    pass
