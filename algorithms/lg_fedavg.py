"""LG-FedAvg — Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, "Think
Locally, Act Globally: Federated Learning with Local and Global Representations",
arXiv:2001.01523, 2020.

The converse of FedPer: each client keeps a local representation (the body, everything but
`classifier`) and the global model is the last layer (Algorithm 1, the supervised case with
the local models trained on the task's loss). Client k trains its body and the received
head for E epochs and sends the head; the server averages heads by sample count:
    θ_g^{t+1} = Σ_k n_k θ_{g,k}^{t+1} / Σ_k n_k,        the local layers θ_{l,k} stay on k.
As only heads are averaged, clients may have different architectures: members of a
heterogeneous group (`model.heterogeneous`) share one head shape through a common
`feature_dim`. Scored by personalised evaluation (`evaluation.personal`).

Privacy as FedAvg's, for the head: central DP clips and noises the head's delta; local DP
uploads the head privatised; the local layers never leave the client.
"""

from __future__ import annotations

from algorithms.fedavg import FedAvg
from raysim.algorithm import PersonalModel


class LGFedAvg(PersonalModel, FedAvg):
    shares = "head"
    needs_features = True  # body and head meet at the features (one width on a group)
    tasks = ("classification",)
