"""What the three built-in worlds share: a cache folder named by the hash of what determines their models, the model
folders inside it (the full model, a retrain reference per target and training seed), the build record
(build.json) and the world models' cached evaluations.

Retrain references: seed 0 is the world's own recipe (folder `retrain-<target>`, as every world has always named
it); seed S > 0 is the same recipe on the same data with only the training seed changed (`retrain-<target>-seedS`).
Two references that differ only in their seed measure the noise floor of every metric. None of them enters the
world's cache key: they are built on demand (`ensure_retrain`) next to the others."""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path


class World:
    """Subclasses give `kind` (the folder's prefix), `cache_dir` (None: the default cache), `key_data()`,
    `check_target()` and `ensure_retrain()`."""

    kind: str
    cache_dir: str | None

    @classmethod
    def from_config(cls, config) -> "World":
        """The world a `WorldConfig` describes."""
        return cls(config)

    # -- identity and paths ----------------------------------------------------------------------------------------
    def key_data(self) -> dict:
        """Everything that determines the world's models; its hash names the cache folder."""
        raise NotImplementedError

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.key_data(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def root(self) -> Path:
        from obliviate.worlds import cache_root

        return cache_root(self.cache_dir) / f"{self.kind}-{self.key()}"

    @property
    def full_model_dir(self) -> Path:
        return self.root / "full"

    def check_target(self, target: str) -> None:
        """Raise ObliviateError naming the valid targets when `target` is not one."""
        raise NotImplementedError

    @staticmethod
    def retrain_name(target: str, seed: int = 0) -> str:
        """The reference's folder (and build-record) name: seed 0 keeps the world's historical name."""
        from obliviate.errors import ObliviateError

        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ObliviateError(f"retrain seed: a whole number >= 0, got {seed!r}")
        return f"retrain-{target}" + (f"-seed{seed}" if seed else "")

    def retrain_dir(self, target: str, seed: int = 0) -> Path:
        self.check_target(target)
        return self.root / self.retrain_name(target, seed)

    # -- the build record and the cached evaluations ---------------------------------------------------------------
    def read_record(self) -> dict:
        path = self.root / "build.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_record(self, record: dict) -> None:
        from obliviate.runs import write_json

        write_json(self.root / "build.json", record)

    @contextlib.contextmanager
    def locked(self):
        """Hold the world's build lock: two processes (a bench's workers) never train the same model twice, and the
        build record's read-modify-write is not lost to a concurrent one. Re-entrant: a world that holds it (a
        worst-case split chosen during a build) takes it again at once."""
        import fcntl

        if self.__dict__.get("_lock_held"):
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".build.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._lock_held = True
            try:
                yield
            finally:
                self._lock_held = False
                fcntl.flock(handle, fcntl.LOCK_UN)

    def cached_evaluation(self, name: str, target: str, settings, compute) -> dict:
        """A world model's evaluation depends only on the world, the target and the evaluation settings (any JSON
        value): computed once, then read from `eval-<name>-<target>-<hash of settings>.json`."""
        from obliviate.runs import cached_json

        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        return cached_json(self.root / f"eval-{name}-{target}-{key}.json", compute)

    # -- retrain references ----------------------------------------------------------------------------------------
    def ensure_retrain(self, target: str, seed: int = 0, log=print) -> Path:
        """Build the full model if needed and the retrain reference of `target` with training seed `seed` if missing
        (never twice: the build lock is held while training); return its folder."""
        raise NotImplementedError

    def _ensure_model(self, folder: Path, label: str, train, log) -> None:
        """Train `folder` with `train(folder) -> stats` unless it is there; record its stats and wall time under
        `label` in build.json."""
        import time

        with self.locked():
            if (folder / "config.json").is_file() or (folder / "model_index.json").is_file():
                return
            t0 = time.time()
            stats = train(folder)
            record = self.read_record()
            record[label] = {**stats, "wall_seconds": round(time.time() - t0, 1)}
            self.write_record(record)
            log(f"{self.kind} world: {label} built in {time.time() - t0:.0f} s ({folder})")


class PeopleWorld(World):
    """A world of people whose targets are forget splits (profiles, portraits): the full model and one retrain
    reference per split and seed. Subclasses give `data()` (with `split_people`), `_build(split, retrain, log)`,
    `_train_model(out, exclude, label, log, seed=0)` and `_check_knowledge(accuracy report, log)`."""

    def build(self, split: str = "forget10", retrain: bool = True, log=print) -> dict:
        """Train (or reuse from the cache) the full model and the retrain model of `split`; returns the build
        record with the models' accuracies."""
        self.data().split_people(split)  # validates the split name early
        with self.locked():
            record = self._build(split, retrain, log)
        self._check_knowledge(record[f"accuracy-{split}"], log)
        return record

    def alternate_rows(self) -> list[dict]:
        """AltPO's alternate answers for every forgettable person, as rows of the file it reads (the world's own
        generator stands in for OpenUnlearning's generate.py); a world without them refuses in one line."""
        from obliviate.errors import ObliviateError
        raise ObliviateError(f"the {self.kind} world has no alternate answers for AltPO: give method_args.alternates "
                             "a file of them")

    def alternates_file(self) -> tuple[Path, str, int]:
        """(path, sha256, rows) of the world's alternates file `alternates-<sha256[:12]>.jsonl` in its folder, written
        once (atomically, under the build lock) and checked on every later use. It follows from the world's data
        alone, so the world's key does not change; a changed generator writes another file and leaves the one that
        earlier runs recorded as it was."""
        import json

        from obliviate.errors import ObliviateError
        from obliviate.runs import atomic_write

        rows = self.alternate_rows()
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / f"alternates-{digest[:12]}.jsonl"
        with self.locked():
            if not path.is_file():
                atomic_write(path, data)
            elif path.read_bytes() != data:
                raise ObliviateError(f"{path}: not the world's alternates (changed since it was written); move it "
                                     "away to have it written again")
        return path, digest, len(rows)

    def ensure_retrain(self, split: str, seed: int = 0, log=print) -> Path:
        """The retrain reference of `split` trained with seed `seed` (the recipe's seed + `seed`: model
        initialisation and batch order), built if missing; seed 0 is the world's own `retrain-<split>`."""
        folder = self.retrain_dir(split, seed)
        self.build(split, retrain=True, log=log)
        if seed:
            forget, _ = self.data().split_people(split)
            self._ensure_model(folder, folder.name, lambda out: self._train_model(
                out, {p.name for p in forget}, f"retrain ({split}, seed {seed})", log, seed=seed), log)
        return folder
