"""GTO's git tags for published versions (iterative/gto): `name@vX.Y.Z` registers a version,
`name#stage#N` assigns a stage; with `dvc.lock` committed, `dvc artifacts get` resolves them."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import RegistryError
from pipeline.registry.artifacts import parse_version, validate_name


@dataclass(frozen=True)
class GitTag:
    tag: str
    commit: str


def _git(repo_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, text=True, check=False)


def _require_repo(repo_dir: Path) -> str:
    """HEAD's commit of the git repository at `repo_dir`."""
    if _git(repo_dir, "rev-parse", "--git-dir").returncode != 0:
        raise RegistryError(
            f"git tags in {repo_dir}",
            "this directory is not a git repository.",
            "run `git init` there, or pass the repository that holds the recipes.",
        )
    head = _git(repo_dir, "rev-parse", "--verify", "-q", "HEAD^{commit}")
    if head.returncode != 0:
        raise RegistryError(
            f"git tags in {repo_dir}", "the repository has no commits yet.", "commit the recipes first."
        )
    return head.stdout.strip()


def has_tag(repo_dir: str | os.PathLike, tag: str) -> bool:
    """Whether the git repository at `repo_dir` has the tag `tag` (lets a re-run skip tags it made before)."""
    return _git(Path(repo_dir), "rev-parse", "-q", "--verify", f"refs/tags/{tag}").returncode == 0


def _create_tag(repo_dir: Path, tag: str, commit: str, message: str) -> GitTag:
    if has_tag(repo_dir, tag):
        raise RegistryError(
            f"git tag {tag}",
            f"already exists in {repo_dir}.",
            "tags are immutable records; publish a new version instead of re-tagging.",
        )
    done = _git(repo_dir, "tag", "-a", tag, "-m", message, commit)
    if done.returncode != 0:
        raise RegistryError(f"git tag {tag}", f"`git tag -a` failed: {done.stderr.strip()}", "fix the git error above.")
    return GitTag(tag, commit)


def tag_version(repo_dir: str | os.PathLike, name: str, version: str, message: str) -> GitTag:
    """Create GTO's version-registration tag `name@vX.Y.Z` (annotated) on HEAD."""
    validate_name(name)
    parse_version(version)
    repo = Path(repo_dir)
    return _create_tag(repo, f"{name}@{version}", _require_repo(repo), message)


def tag_stage(repo_dir: str | os.PathLike, name: str, stage: str, message: str, version: str | None = None) -> GitTag:
    """Create GTO's stage-assignment tag `name#stage#N` (annotated).

    It goes on the commit of `name@version` when `version` is given (so GTO reads it as
    assigning that version), else on HEAD. N is one more than the largest N of any stage tag of
    this artifact, as GTO numbers them (iterative/gto, gto/tag.py `name_tag`).
    """
    validate_name(name)
    validate_name(stage, kind="stage name")
    repo = Path(repo_dir)
    commit = _require_repo(repo)
    if version is not None:
        parse_version(version)
        found = _git(repo, "rev-parse", "-q", "--verify", f"refs/tags/{name}@{version}^{{commit}}")
        if found.returncode != 0:
            raise RegistryError(
                f"git tags in {repo}",
                f"there is no tag {name}@{version} to assign a stage to.",
                "register it first (tag_version), or omit the version to tag HEAD.",
            )
        commit = found.stdout.strip()
    listed = _git(repo, "tag", "--list", f"{name}#*")
    numbers = [int(m[1]) for t in listed.stdout.split() if (m := re.fullmatch(rf"{re.escape(name)}#[^#]+#([0-9]+)", t))]
    return _create_tag(repo, f"{name}#{stage}#{max(numbers, default=0) + 1}", commit, message)
