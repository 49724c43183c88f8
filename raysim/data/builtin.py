"""The bundled datasets as plug-ins (registered under `raysim.datasets` in pyproject.toml).

A dataset plug-in is an object with `task` ("classification" or "segmentation"), `check(data)`
(raise DatasetNotFoundError, with what to put where, before any work starts) and
`load(data) -> Dataset`, where `data` is the run's `DataConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raysim.data.datasets import (
    Dataset,
    check_dataset,
    dataset_task,
    load_dataset,
)

NUCLEI_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class BuiltinDataset:
    name: str

    @property
    def task(self) -> str:
        return dataset_task(self.name)

    def check(self, data: Any) -> None:
        check_dataset(self.name, data.root, data.download)

    def load(self, data: Any) -> Dataset:
        val_fraction = NUCLEI_VAL_FRACTION if data.val_fraction is None else data.val_fraction
        dataset = load_dataset(self.name, data.root, data.download, data.test_fraction,
                               synthetic=data.synthetic, image_size=data.image_size,
                               val_fraction=val_fraction,
                               label_resize=data.label_resize or "nearest")
        return dataset


digits = BuiltinDataset("digits")
digits_domains = BuiltinDataset("digits_domains")
mnist = BuiltinDataset("mnist")
fashionmnist = BuiltinDataset("fashionmnist")
cifar10 = BuiltinDataset("cifar10")
cifar100 = BuiltinDataset("cifar100")
svhn = BuiltinDataset("svhn")
synthetic_organ = BuiltinDataset("synthetic_organ")
synthetic_nuclei = BuiltinDataset("synthetic_nuclei")
prostate_mri = BuiltinDataset("prostate_mri")
nuclei = BuiltinDataset("nuclei")
