"""Elastic training: rescale on node loss and join, world-size-aware data order
and a constant global batch (see :mod:`hpresil.elastic.api`)."""

from hpresil.elastic.api import ElasticConfig, MembershipView
from hpresil.elastic.batch import BatchPlan, plan_batch
from hpresil.elastic.sampler import ElasticSampler

__all__ = ["ElasticConfig", "MembershipView", "BatchPlan", "plan_batch", "ElasticSampler"]
