"""FedTGP in its own protocol — Zhang, Liu, Hua, Cao, "FedTGP: Trainable Global Prototypes with
Adaptive-Margin-Enhanced Contrastive Learning for Data and Model Heterogeneity in Federated
Learning", AAAI 2024: personal models, no weight averaging.

Everything of `algorithms/fedtgp.py` (clients as in FedProto; the server trains the global
prototypes P^c = F(e_c) with the adaptive-margin contrastive loss, Eq. 5–7) but the weight
averaging added there for a global test set: as in the paper and HtFLlib, clients exchange
prototypes only, keep their whole (possibly heterogeneous, `model.heterogeneous`) models, and
are scored each on its own test part (`evaluation.personal`).

Privacy: local DP uploads the prototypes as FedProto's (clipped per sample, noised sums and
counts) and no weights: any one sample is protected; central DP is refused.
"""

from __future__ import annotations

from algorithms.fedtgp import FedTGP
from raysim.algorithm import PersonalModel


class FedTGPPersonal(PersonalModel, FedTGP):
    shares = "none"
