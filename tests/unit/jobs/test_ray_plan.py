"""Sizing of the Ray actor pool (`plan_actors`), and the options' validation; no cluster needed."""

from __future__ import annotations

import pytest

from service.jobs.files import JobError
from service.jobs.ray_job import ActorPlan, NodeResources, RayJobOptions, plan_actors

AUTO = RayJobOptions()


def test_cpu_actors_take_a_whole_node_each() -> None:
    nodes = [NodeResources(cpus=16, gpus=0), NodeResources(cpus=16, gpus=0), NodeResources(cpus=0, gpus=0)]
    assert plan_actors(nodes, gpu=False, options=AUTO) == ActorPlan(actors=2, num_cpus=16, num_gpus=0)


def test_cpu_actors_are_sized_to_the_smallest_node() -> None:
    nodes = [NodeResources(cpus=8, gpus=0), NodeResources(cpus=16, gpus=0)]
    assert plan_actors(nodes, gpu=False, options=AUTO) == ActorPlan(actors=3, num_cpus=8, num_gpus=0)


def test_one_gpu_actor_per_gpu_with_its_share_of_cpus() -> None:
    nodes = [NodeResources(cpus=32, gpus=4), NodeResources(cpus=16, gpus=2), NodeResources(cpus=8, gpus=0)]
    assert plan_actors(nodes, gpu=True, options=AUTO) == ActorPlan(actors=6, num_cpus=8, num_gpus=1)


def test_explicit_counts_win() -> None:
    nodes = [NodeResources(cpus=16, gpus=0)]
    plan = plan_actors(nodes, gpu=False, options=RayJobOptions(actors=3, cpus_per_actor=4))
    assert plan == ActorPlan(actors=3, num_cpus=4, num_gpus=0)


def test_impossible_plans_say_what_to_do() -> None:
    with pytest.raises(JobError, match="no GPU"):
        plan_actors([NodeResources(cpus=8, gpus=0)], gpu=True, options=AUTO)
    with pytest.raises(JobError, match="no node"):
        plan_actors([NodeResources(cpus=0, gpus=0)], gpu=False, options=AUTO)
    with pytest.raises(JobError, match="lower cpus_per_actor"):
        plan_actors([NodeResources(cpus=2, gpus=0)], gpu=False, options=RayJobOptions(cpus_per_actor=4))


def test_options_validate() -> None:
    with pytest.raises(ValueError, match="address is empty"):
        RayJobOptions(address="")
    with pytest.raises(ValueError, match="rows_per_task"):
        RayJobOptions(rows_per_task=-1)
