"""The computation behind `msrl evaluate`: sources → features → records → paired comparisons.

`EvaluationRun` holds the real reference sets, the extractors' features of them, the fine-tuned
run's reward and every source's volumes, and produces metrics.json's content. Reading the inputs
and writing the outputs stay in msrl/commands/evaluate.py. The reward scores each set of volumes with the
masks it carries (msrl/evaluation/reward_scores.py).
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from torch import nn

from datamodules.base import VolumeDataModule
from lightning_modules.finetune import REWARD_KEY
from msrl.commands.evaluate_masks import SegmentationJudge, build_heldout, segmentation_wanted
from msrl.commands.evaluate_sources import (
    Heldout,
    Sampler,
    SourceVolumes,
    check_conditioning_files,
    checkpoint_metadata,
    draws_from_masks,
    read_generated,
    real_masks,
    real_volumes,
    reconstruct,
    sample_checkpoint,
    samplers_for,
    source_entry,
)
from msrl.evaluation.comparison import paired_distribution, paired_records
from msrl.evaluation.extractors import FeatureExtractor
from msrl.evaluation.fidelity import fidelity_records
from msrl.evaluation.independence import recorded_networks, refuse_shared_weights
from msrl.evaluation.metrics import mean_t_ci
from msrl.evaluation.scores import (
    SCHEMA_VERSION,
    FeatureCache,
    Features,
    distribution_records,
    diversity_records,
    main_view,
    memorisation_records,
    reward_records,
    utility_records,
)
from msrl.evaluation.segmentation import SegmentationProtocol
from msrl.evaluation.segmenter import MaskedVolumes
from msrl.evaluation.utility import UTILITY_METRICS, LabelledVolumes, UtilityProtocol

log = logging.getLogger(__name__)


class EvaluationRun:
    """One `msrl evaluate` computation (see the module docstring)."""

    def __init__(self, config: Namespace, protocol: UtilityProtocol, data: VolumeDataModule,
                 extractors: list[FeatureExtractor], device: torch.device, evaluation: Sampler,
                 segmentation: SegmentationProtocol | None = None) -> None:
        self.config, self.protocol, self.data, self.device, self.evaluation = config, protocol, data, device, evaluation
        self.segmentation = segmentation or SegmentationProtocol()
        self.heldout: Heldout | None = None  # the masks checkpoints draw from (a ControlNet, or segmentation on)
        self.judge: SegmentationJudge | None = None  # the real-trained segmenters (segmentation on)
        self.extractors = extractors
        self.metadata: dict[str, dict[str, Any]] = {}
        self.reward: nn.Module | None = None
        self.reward_origin: dict[str, Any] | None = None
        self.volumes: list[SourceVolumes] = []
        self.classifiers: list[nn.Module] = []  # the real-trained utility classifiers, one per utility seed

    # Inputs ------------------------------------------------------------------------------------
    def check_independence(self, sources: dict[str, tuple[str, str]]) -> None:
        """Read the checkpoints' records (refusing missing or changed ControlNet and base files), rebuild the reward,
        refuse extractors that share its weights."""
        self.metadata = {path: checkpoint_metadata(path) for kind, path in sources.values() if kind == "checkpoint"}
        check_conditioning_files(self.metadata)
        networks = recorded_networks(self.metadata)
        if not self.config.skip_reward:
            self.reward, self.reward_origin = self._load_reward()
        if self.reward is not None:  # a reward given as YAML: its own network files count as well
            from lightning_modules.finetune.reward import reward_networks

            networks += [{**n, "checkpoint": "--reward"} for n in reward_networks(self.reward)]
        refuse_shared_weights(self.extractors, networks, self.reward)

    def _load_reward(self) -> tuple[nn.Module | None, dict[str, Any] | None]:
        from rewards.loading import reward_from_config

        if self.config.reward:
            config = yaml.safe_load(Path(self.config.reward).read_text())
            return reward_from_config(config).to(self.device).eval(), {"from": str(self.config.reward)}
        for path, info in self.metadata.items():
            recorded = info.get(REWARD_KEY) or {}
            if recorded.get("config"):
                reward = reward_from_config(recorded["config"], recorded.get("networks", [])).to(self.device)
                return reward, {"from": path, "networks": recorded.get("networks", [])}
        return None, None

    def read_real(self) -> None:
        """The real reference (and the training split beside it), and the utility classifiers' splits."""
        config, data = self.config, self.data
        self.reference = real_volumes(data, config.real_split)
        references = {config.real_split: self.reference}
        if config.real_split not in ("train", "all"):  # FID against the training split beside the held-out one
            references["train"] = real_volumes(data, "train")
        self.references = references
        # the utility classifiers' splits: train on train, test on the held-out reference split (val while
        # tuning, so that tuning never reads test); --skip-utility needs neither (a data set may have no test split)
        self.utility_split = config.real_split if config.real_split in ("val", "test") else "test"
        self.train, self.test = (None, None) if config.skip_utility else (
            real_volumes(data, "train"), real_volumes(data, self.utility_split))
        self._read_masks()

    def _read_masks(self) -> None:
        """The held-out masks when a checkpoint draws from them or segmentation runs (same split as utility)."""
        controlnets = any(draws_from_masks(info) for info in self.metadata.values())
        serves = real_masks(self.data, "train") is not None
        segment = segmentation_wanted(self.config.skip_segmentation, controlnets, serves)
        if not (controlnets or segment):
            return
        split = self.utility_split
        heldout = self.test if self.test is not None else real_volumes(self.data, split)
        draws = max([len(self.segmentation.seeds) if segment else 0,
                     0 if self.config.skip_utility else len(self.protocol.seeds)])
        self.heldout = build_heldout(self.data, split, heldout, self.config.num_samples, draws)
        self.heldout_volumes = heldout
        if segment:
            self.judge = SegmentationJudge(self.segmentation, self.heldout, heldout, self.config.batch_size,
                                           self.config.seed)

    # Computation -------------------------------------------------------------------------------
    def compute(self, sources: dict[str, tuple[str, str]]) -> dict[str, Any]:
        """Every record of every source and every paired comparison with the baseline."""
        config = self.config
        cache = FeatureCache(self.extractors, self.references, config.batch_size)
        samplers = samplers_for(self.evaluation, self.metadata) if config.rollout_sampler else [self.evaluation]
        result: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "created": _now(),
            "data": {"class_path": f"{type(self.data).__module__}.{type(self.data).__name__}",
                     "spatial_size": self.data.spatial_size, "real_split": config.real_split,
                     "num_real": len(self.reference.labels),
                     "num_train": len(self.references["train"].labels) if "train" in self.references else None,
                     "num_test": None if self.test is None else len(self.test.labels),
                     "utility_test_split": None if self.test is None else self.utility_split,
                     "segmentation_test_split": None if self.judge is None else self.utility_split,
                     "num_segmentation_test": None if self.judge is None else len(self.judge.test.volumes),
                     "num_segmentation_train": None if self.judge is None else len(self.judge.heldout.train.volumes)},
            "extractors": [e.name for e in self.extractors],
            "primary": {"metric": "fid", "extractor": self.extractors[0].name,
                        "view": main_view(cache.real[config.real_split][self.extractors[0].name]),
                        "class": "all", "reference": config.real_split},
            "samplers": {"evaluation": self.evaluation.label, "all": [s.as_dict() for s in samplers]},
            "reward": self.reward_origin,
            "real": {"records": self._real_records()},
            "entries": [], "comparisons": [],
        }
        features: dict[str, Features] = {}
        records: dict[str, list[dict[str, Any]]] = {}
        for name, (kind, path) in sources.items():
            for source, draws, pairs in self._load(name, kind, path, samplers):
                print(f"msrl evaluate: {source.key}: {len(source.volumes.labels)} volumes, computing metrics",
                      flush=True)
                features[source.key] = cache.features(source.volumes.volumes)
                records[source.key] = self._records(cache, source, features[source.key], draws, pairs)
                result["entries"].append({**source_entry(source), "num_samples": len(source.volumes.labels),
                                          "samples_dir": "samples/" + source.key.replace("/", "_").replace(" ", "_"),
                                          "records": records[source.key]})
                self.volumes.append(source)
        result["comparisons"] = self._comparisons(cache, features, records)
        return result

    def _load(self, name: str, kind: str, path: str, samplers: list[Sampler]
              ) -> list[tuple[SourceVolumes, list[LabelledVolumes], list[MaskedVolumes]]]:
        """Each of the source's volume sets with its utility draws and (a ControlNet's) synthetic pairs."""
        config = self.config
        if kind == "checkpoint":
            from_masks = draws_from_masks(self.metadata[path])
            extra = 0 if config.skip_utility else max(len(self.protocol.seeds) - 1, 0)
            sampled, draws, pairs = sample_checkpoint(
                name, path, samplers, self.evaluation, config.num_samples, config.seed, config.batch_size, self.data,
                self.device, extra_draws=extra, from_masks=from_masks, heldout=self.heldout)
            if not from_masks:  # a draw from held-out masks is never a training set
                draws = [sampled[0].volumes, *draws]
            return [(s, draws, pairs) if s.sampler == self.evaluation else (s, [], []) for s in sampled]
        if kind == "generated":
            source = read_generated(name, path, self.data)
            return [(source, [source.volumes], [])]
        # reconstructions of held-out volumes would leak into utility; they carry the masks of the split they show
        masks = self.heldout.masks if self.heldout is not None and config.real_split == self.utility_split else None
        source = reconstruct(name, path, self.reference, config.batch_size, self.device, config.real_split, masks)
        return [(source, [], [])]

    def _records(self, cache: FeatureCache, source: SourceVolumes, features: Features,
                 draws: list[LabelledVolumes], pairs: list[MaskedVolumes]) -> list[dict[str, Any]]:
        config, volumes = self.config, source.volumes
        rows = distribution_records(cache, features, volumes.labels, config.bootstrap, config.kid_subsets, config.seed)
        rows += diversity_records(volumes.volumes, config.ms_ssim_pairs, config.seed)
        rows += self._reward_records(volumes, source.masks, source.key)
        rows += memorisation_records(features, volumes.volumes, cache, self.extractors[0].name)
        if draws and not config.skip_utility:
            sets = [draws[i % len(draws)] for i in range(len(self.protocol.seeds))]
            rows += self._utility(sets, "synthetic")
            rows += self._utility([self.train + s for s in sets], "real+synthetic")
        if self.classifiers:  # every source and sampler, reconstructions included
            rows += self._fidelity(volumes)
        if self.judge is not None and pairs:
            rows += self.judge.utility_records(pairs)
        if self.judge is not None and source.masked is not None:
            rows += self.judge.fidelity(source.masked)
        sampler = None if source.sampler is None else source.sampler.label
        return [{**row, "sampler": sampler} for row in rows]

    def _real_records(self) -> list[dict[str, Any]]:
        rows = diversity_records(self.reference.volumes, self.config.ms_ssim_pairs, self.config.seed)
        # the held-out masks are the reference's own when both are the same split (in the same order)
        masks = self.heldout.masks if self.heldout is not None and self.config.real_split == self.utility_split \
            else None
        rows += self._reward_records(self.reference, masks, f"the real {self.config.real_split} split")
        if not self.config.skip_utility:
            # trained once per utility seed and kept: they also judge class fidelity
            self.classifiers = self.protocol.classifiers(self.train, self.data.num_classes)
            runs = [self.protocol.test(network, self.test, self.data.num_classes) for network in self.classifiers]
            rows += self._utility_rows(runs, len(self.train.labels), "real")
            rows += self._fidelity(self.test)  # the ceiling: the classifiers on held-out real volumes
        if self.judge is not None:  # trained once per segmentation seed and kept: they also judge mask fidelity
            rows += self.judge.real_records()
        return rows

    def _utility(self, train_sets: list[LabelledVolumes], train_set: str) -> list[dict[str, Any]]:
        runs = self.protocol.runs(train_sets, self.test, self.data.num_classes)
        return self._utility_rows(runs, len(train_sets[0].labels), train_set)

    def _utility_rows(self, runs: list[dict[str, Any]], num_train: int, train_set: str) -> list[dict[str, Any]]:
        results = {name: mean_t_ci([run[name] for run in runs]) for name in UTILITY_METRICS}
        return utility_records(results, runs, len(self.test.labels), num_train, train_set, self.protocol.seeds,
                               test_labels=self.test.labels.tolist())

    def _fidelity(self, volumes: LabelledVolumes) -> list[dict[str, Any]]:
        return fidelity_records(self.classifiers, volumes, self.protocol.seeds, len(self.train.labels),
                                self.config.batch_size, self.config.seed)

    def _reward_records(self, volumes: LabelledVolumes, masks: torch.Tensor | None, what: str
                        ) -> list[dict[str, Any]]:
        """The reward's raw scores; its mask-reading parts against `masks` (skipped, with a note, without them)."""
        if self.reward is None:
            return []
        from msrl.evaluation.reward_scores import reward_scores

        scores = reward_scores(self.reward, volumes.volumes, volumes.labels, masks, self.config.batch_size,
                               self.device, what)
        return reward_records(scores, self.config.seed)

    def _comparisons(self, cache: FeatureCache, features: dict[str, Features],
                     records: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Every checkpoint against the baseline, at every sampler both were drawn with (paired by seed)."""
        checkpoints = [s for s in self.volumes if s.kind == "checkpoint"]
        baseline_name = self.config.baseline or (checkpoints[0].name if checkpoints else None)
        comparisons = []
        for candidate in checkpoints:
            if candidate.name == baseline_name:
                continue
            baseline = next((s for s in checkpoints if s.name == baseline_name and s.sampler == candidate.sampler),
                            None)
            if baseline is None:
                continue
            print(f"msrl evaluate: paired comparison {candidate.key} − {baseline.key}", flush=True)
            rows = paired_distribution(cache, features[baseline.key], features[candidate.key],
                                       candidate.volumes.labels, self.config.paired_bootstrap, self.config.seed)
            rows += paired_records(records[baseline.key], records[candidate.key], self.config.paired_bootstrap,
                                   self.config.seed)
            comparisons.append({"baseline": baseline.key, "candidate": candidate.key,
                                "sampler": candidate.sampler.label, "num_volumes": len(candidate.volumes.labels),
                                "records": rows})
        return comparisons


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")
