"""The instance families ``--net-env`` knows (instance facts, not rules), and
the sources the rule table cites.

A table of data that :mod:`hpresil.netenv.api` (the ``--net-env`` presets),
:mod:`hpresil.netenv.detect` and :mod:`hpresil.netenv.rules` all read.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["Family", "FAMILIES", "family_of", "SOURCES"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Family:
    """An instance family.

    Attributes:
        name: the family (also the ``--net-env`` preset name).
        pattern: regex an instance type of the family matches (anchored at the start).
        canonical: the instance type a preset stands for.
        accelerator: ``nvidia`` or ``neuron``.
        efa_expected: EFA devices per instance type, where a source gives the number.
        source: where the instance facts come from.
    """

    name: str
    pattern: str
    canonical: str
    accelerator: str
    efa_expected: dict[str, int] = dataclasses.field(default_factory=dict)
    source: str = "https://docs.aws.amazon.com/ec2/latest/instancetypes/ac.html"


#: Known sources, by short name.
SOURCES = {
    "cheatsheet": "https://github.com/aws-samples/awsome-distributed-training/blob/main/1.architectures/efa-cheatsheet.md",
    "plugin": "https://github.com/aws/aws-ofi-nccl/blob/master/src/platform-aws.cpp",
    "plugin_readme": "https://github.com/aws/aws-ofi-nccl#readme",
    "nccl_env": "https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html",
    "torch_nccl_env": "https://docs.pytorch.org/docs/stable/torch_nccl_environment_variables.html",
    "torch_fr": "https://docs.pytorch.org/docs/stable/torch_nccl_environment_variables.html (TORCH_NCCL_DUMP_ON_TIMEOUT "
                "needs TORCH_NCCL_TRACE_BUFFER_SIZE > 0); hpresil docs/architecture.md, Hang detection",
    "rdzv_store": "https://github.com/pytorch/pytorch/issues/135712",
    "imex": "https://docs.nvidia.com/multi-node-nvlink-systems/imex-guide/ ; NCCL docs, NCCL_MNNVL_ENABLE",
    "efa_p5": "https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/efa-acc-inst-types.html",
    "neuron": "AWS Neuron multi-node training scripts (e.g. aws-neuron/neuronx-nemo-megatron test_llama.sh): "
              "FI_EFA_USE_DEVICE_RDMA=1, FI_PROVIDER=efa, FI_EFA_FORK_SAFE=1",
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(name="p4d", pattern=r"p4d\.", canonical="p4d.24xlarge", accelerator="nvidia",
               efa_expected={"p4d.24xlarge": 4}),
        Family(name="p4de", pattern=r"p4de\.", canonical="p4de.24xlarge", accelerator="nvidia",
               efa_expected={"p4de.24xlarge": 4}),
        Family(name="p5", pattern=r"p5\.", canonical="p5.48xlarge", accelerator="nvidia",
               efa_expected={"p5.48xlarge": 32}, source=SOURCES["efa_p5"]),
        Family(name="p5e", pattern=r"p5e\.", canonical="p5e.48xlarge", accelerator="nvidia",
               efa_expected={"p5e.48xlarge": 32}, source=SOURCES["efa_p5"]),
        Family(name="p5en", pattern=r"p5en\.", canonical="p5en.48xlarge", accelerator="nvidia",
               efa_expected={"p5en.48xlarge": 16}),
        Family(name="p6-b200", pattern=r"p6-b200\.", canonical="p6-b200.48xlarge", accelerator="nvidia",
               efa_expected={"p6-b200.48xlarge": 8}),
        # EFA counts of the B300 and GB200 types are reported, not checked: no
        # source we hold gives them.
        Family(name="p6-b300", pattern=r"p6-b300\.", canonical="p6-b300.48xlarge", accelerator="nvidia"),
        Family(name="p6e-gb200", pattern=r"p6e-gb200\.", canonical="p6e-gb200.36xlarge", accelerator="nvidia"),
        Family(name="trn1", pattern=r"trn1n?\.", canonical="trn1.32xlarge", accelerator="neuron",
               efa_expected={"trn1.32xlarge": 8, "trn1n.32xlarge": 16}),
        Family(name="trn2", pattern=r"trn2u?\.", canonical="trn2.48xlarge", accelerator="neuron",
               efa_expected={"trn2.48xlarge": 16}),
    )
}


def family_of(instance_type: str | None) -> str:
    """The family an instance type belongs to, ``unknown`` when none matches."""
    if instance_type:
        for family in FAMILIES.values():
            if re.match(family.pattern, instance_type):
                return family.name
    return "unknown"
