"""``python -m vlm_inspect.reproduce MANIFEST ...``: re-make tables of ``docs/`` from their manifests.

Runs the training runs and evaluations a table needs (``--jobs`` at a time, each its own process on
``--threads`` threads), skipping what is done and continuing what a kill cut short, with one progress bar
over all of it and an estimate of the time left; then writes the table. Run the same command again after
a kill, a reboot or a session's end: it picks up where the work stopped.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from .manifest import Manifest, ManifestError, find, load_manifest, manifest_dir
from .plan import DONE, RESUME, Job, eval_state, plan, stamp_path, train_state, weights_hash

POLL = 2.0  # seconds between looks at the running jobs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vlm_inspect.reproduce", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Re-make a table of docs/ from its manifest in reproduce/: its training runs at every seed, "
                    "its evaluations, then mean ± sd over seeds with 95 % intervals and the papers' claims. Only "
                    "what is missing runs; after a kill or a session's end, the same command continues.",
        epilog="e.g. python -m vlm_inspect.reproduce threat-model --plan; "
               "python -m vlm_inspect.reproduce caption-defenses --jobs 2")
    p.add_argument("manifests", nargs="*", metavar="MANIFEST",
                   help="a .toml file, or the name of one in reproduce/ (see --list)")
    p.add_argument("--all", action="store_true", help="every manifest in reproduce/")
    p.add_argument("--list", action="store_true", help="list the manifests in reproduce/ and stop")
    p.add_argument("--claims", action="store_true",
                   help="write docs/claims.md: every manifest's claims from the tables already made; runs nothing")
    p.add_argument("--partial", action="store_true",
                   help="write the table from the evaluations finished so far, marked partial; runs nothing")
    p.add_argument("--plan", action="store_true", help="show the jobs, which are done, and the time left; run nothing")
    p.add_argument("--jobs", type=int, default=1, help="jobs at a time (each a process of its own)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per job (OMP_NUM_THREADS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per finished job)")
    return p


def _minutes_done(job: Job, running_since: float | None = None) -> float:
    """The estimated minutes of a job's work already done: all of a finished job; a run's recorded steps
    (a resumed run's earlier ones too); an evaluation's data sets in its journal, plus a running one's
    elapsed time against its estimate, never past 95 % (it has no step count to read)."""
    if job.state == DONE:
        return job.minutes
    if job.kind == "train" and job.steps and (job.state == RESUME or running_since is not None):
        return job.minutes * min(1.0, _steps_done(job) / job.steps)
    done = 0.0
    if job.kind == "evaluate" and job.units and job.state == RESUME:
        done = job.minutes * min(0.95, job.journal / job.units)
    if running_since is not None:
        done += (time.time() - running_since) / 60
    return min(0.95 * job.minutes, done)


def _minutes_left(job: Job) -> float:
    return job.minutes - _minutes_done(job)


def _steps_done(job: Job) -> int:
    import json

    try:
        return int(json.loads((job.folder / "config.json").read_text()).get("steps") or 0)
    except (OSError, ValueError, AttributeError):
        return 0


def _duration(minutes: float) -> str:
    if 0 < minutes and round(minutes) == 0:
        return "< 1 min"
    h, m = divmod(round(minutes), 60)
    return f"{h} h {m:02d} min" if h else f"{m} min"


def describe(name: str, jobs: list[Job], n_jobs: int) -> str:
    counts = {s: sum(j.state == s for j in jobs) for s in ("done", "resume", "fresh")}
    left = sum(_minutes_left(j) for j in jobs)
    lines = [f"{name}: {len(jobs)} jobs ({counts['done']} done, {counts['resume']} to resume, {counts['fresh']} to run); "
             f"about {_duration(left)} of one-thread work left, {_duration(left / max(1, n_jobs))} on {n_jobs} "
             f"job(s) at a time"]
    width = max((len(j.label) for j in jobs), default=0)
    for j in jobs:
        left_j = _minutes_left(j)
        lines.append(f"  [{j.state:>6}] {j.kind:<8} {j.label:<{width}}  {'' if j.state == DONE else _duration(left_j)}")
    return "\n".join(lines)


class Runner:
    """Runs jobs as processes in the manifest's root, ``jobs`` at a time, training before the evaluations
    that need it. Each child holds the manifest's lock too, so a killed ``reproduce`` whose children still
    run cannot be started again over them."""

    def __init__(self, m: Manifest, jobs: list[Job], n_jobs: int, threads: int, lock, progress: bool):
        self.m, self.jobs, self.n, self.threads, self.lock = m, jobs, n_jobs, threads, lock
        self.running: dict[tuple[str, str], tuple[Job, subprocess.Popen, float]] = {}
        self.failed: list[tuple[Job, str]] = []
        self.progress = progress

    def log(self, job: Job) -> Path:
        return self.m.at(self.m.runs_dir) / "logs" / (job.kind + "-" + job.label.replace(" ", "-").replace("/", "_") + ".log")

    def _say(self, text: str, error: bool = False) -> None:
        from tqdm import tqdm

        if self.progress:
            tqdm.write(text, file=sys.stderr if error else sys.stdout)
        else:
            print(text, file=sys.stderr if error else sys.stdout, flush=True)

    def _ready(self) -> list[Job]:
        trained = {j.label for j in self.jobs if j.kind == "train" and j.state == DONE}
        return [j for j in self.jobs if j.state != DONE and (j.kind, j.label) not in self.running
                and all(n in trained for n in j.needs)]

    def _start(self, job: Job) -> None:
        log = self.log(job)
        log.parent.mkdir(parents=True, exist_ok=True)
        if job.kind == "evaluate" and job.folder is not None:  # the weights this evaluation is of
            stamp_path(job.out).parent.mkdir(parents=True, exist_ok=True)
            stamp_path(job.out).write_text((weights_hash(job.folder) or "") + "\n")
        here = str(Path(__file__).resolve().parents[2])  # the jobs run this very package, wherever their cwd
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
        with log.open("a") as f:
            f.write(f"\n$ {job.command}\n")
            f.flush()
            proc = subprocess.Popen([sys.executable, "-m", f"vlm_inspect.{job.kind}", *job.argv], stdout=f,
                                    stderr=subprocess.STDOUT, env=env, cwd=self.m.root,
                                    pass_fds=(self.lock.fileno(),))
        self.running[job.kind, job.label] = (job, proc, time.time())

    def _finished(self, job: Job, rc: int) -> None:
        """A job's exit: done only when what it should have written is there (a resumed run that wrote no
        checkpoint, an evaluation without its JSON, are failures however they exited)."""
        if rc == 0 and job.kind == "train":
            ok = train_state(self.m, job.folder, job.config) == DONE
        else:
            ok = rc == 0 and eval_state(job) == DONE
        if ok:
            job.state = DONE
            self._say(f"done: {job.kind} {job.label}")
            return
        why = f"exit {rc}" if rc else "it exited without writing its result"
        self.failed.append((job, why))
        waiting = len(self.running)
        self._say(f"error: {job.kind} {job.label} failed ({why}); its log is {self.log(job)}:\n"
                  f"{_last_lines(self.log(job))}" + (f"\nno new job starts; waiting for the {waiting} running "
                                                    "one(s) to finish (Ctrl-C stops them)" if waiting else ""),
                  error=True)

    def _done_part(self) -> float:
        """Estimated minutes of work finished, counting the running jobs' progress."""
        since = {(job.kind, job.label): t0 for job, _, t0 in self.running.values()}
        return sum(_minutes_done(j, since.get((j.kind, j.label))) for j in self.jobs)

    def run(self) -> bool:
        from tqdm import tqdm

        total = sum(j.minutes for j in self.jobs)
        bar = tqdm(total=round(total, 1), initial=round(self._done_part(), 1), unit="min",
                   disable=not self.progress, desc="reproduce", dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} est. min of work [{elapsed} elapsed, {remaining} left]")
        try:
            while True:
                for key, (job, proc, _) in list(self.running.items()):
                    rc = proc.poll()
                    if rc is not None:
                        del self.running[key]
                        self._finished(job, rc)
                if not self.failed:
                    for job in self._ready()[: self.n - len(self.running)]:
                        self._start(job)
                if not self.running:
                    break
                bar.n = round(min(total, self._done_part()), 1)
                bar.refresh()
                time.sleep(POLL)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM / SIGHUP (see main): stop the children with us
            for _, proc, _ in self.running.values():
                proc.terminate()
            for _, proc, _ in self.running.values():
                proc.wait()
            bar.close()
            print("stopped; the same command continues where this stopped", file=sys.stderr)
            return False
        bar.close()
        return not self.failed and all(j.state == DONE for j in self.jobs)


def _last_lines(path: Path, n: int = 6) -> str:
    try:
        return "\n".join("    " + x for x in path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for p in sorted(manifest_dir().glob("*.toml")):
            try:
                m = load_manifest(p)
                jobs = plan(m)
            except ManifestError as e:
                print(f"{p.stem}: (cannot be planned: {e})")
                continue
            left = sum(_minutes_left(j) for j in jobs)
            done = sum(j.state == DONE for j in jobs)
            status = "all done" if done == len(jobs) else f"{done} of {len(jobs)} jobs done, about {_duration(left)} left"
            print(f"{p.stem}: {m.title} [{status}]")
        return 0
    if args.claims:
        from .table import write_claims

        try:  # the manifests named, else every one of reproduce/
            every = [load_manifest(find(n)) for n in args.manifests] or \
                [load_manifest(p) for p in sorted(manifest_dir().glob("*.toml"))]
        except ManifestError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print("wrote " + ", ".join(map(str, write_claims(every, manifest_dir().resolve().parent))))
        return 0
    if args.jobs < 1 or args.threads < 1:
        print("error: --jobs and --threads must be >= 1", file=sys.stderr)
        return 2
    names = [str(p) for p in sorted(manifest_dir().glob("*.toml"))] if args.all else args.manifests
    if not names:
        print("error: name a manifest (see --list) or give --all", file=sys.stderr)
        return 2
    try:
        manifests = [load_manifest(find(n)) for n in names]
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # a kill of reproduce stops its jobs too (they resume next time)
    signal.signal(signal.SIGHUP, _interrupt)
    from .table import write

    wrote_partial = False
    for m in manifests:
        if args.plan or args.partial:  # read-only: no lock, so that they work while a run is under way
            jobs = _planned(m, args.jobs)
            if jobs is None:
                return 2
            if args.partial:
                if not any(j.kind == "evaluate" and j.state == DONE for j in jobs):
                    print(f"{m.name}: no finished evaluation yet, no table written", file=sys.stderr)
                    continue
                wrote_partial = True
                print("wrote " + ", ".join(map(str, write(m, jobs, "python -m vlm_inspect.reproduce " + _shown(m),
                                                          partial=True))))
            continue
        lock = _lock(m.at(m.runs_dir))  # before the plan: a live run's folder is not taken for junk
        if lock is None:
            print(f"error: another reproduce is running {m.name} (it, or a job it started, holds "
                  f"{m.at(m.runs_dir) / '.lock'}); wait for it or stop it", file=sys.stderr)
            return 2
        try:
            jobs = _planned(m, args.jobs)
            if jobs is None:
                return 2
            runner = Runner(m, jobs, args.jobs, args.threads, lock, not args.no_progress)
            if not runner.run():
                return 1
            print("wrote " + ", ".join(map(str, write(m, jobs, "python -m vlm_inspect.reproduce " + _shown(m)))))
        finally:
            lock.close()
    return 1 if args.partial and not wrote_partial else 0


def _planned(m: Manifest, n_jobs: int) -> list[Job] | None:
    """The manifest's jobs, described on stdout; None (and the reason on stderr) when it cannot be planned."""
    try:
        jobs = plan(m)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    print(describe(m.name, jobs, n_jobs))
    return jobs


def _shown(m: Manifest) -> str:
    """The manifest as a reader would type it: its name when it is one of reproduce/, else its path."""
    if m.path.resolve().parent == manifest_dir().resolve():
        return m.name
    return shlex.quote(str(m.path))


def _lock(runs_dir: Path):
    """An exclusive lock on ``<runs>/.lock`` while this process, or a job it started, runs the manifest (the
    OS drops it when the last of them ends, so a kill leaves no stale lock); None when another holds it."""
    import fcntl

    runs_dir.mkdir(parents=True, exist_ok=True)
    f = (runs_dir / ".lock").open("a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f
