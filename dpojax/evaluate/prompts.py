"""The prompt sets ``dpojax eval --prompts`` reads, all from local paths (nothing is downloaded).

``read_prompts`` tells the kind from the path: a text file (one prompt per line), PartiPrompts (``.tsv``), an
HPSv2 benchmark style (``.json``) or a folder of them, or a ``dpojax data prepare`` dataset (a Pick-a-Pic
split's captions). Every bad input is a one-line ``ValueError`` naming the file or folder.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_SPLIT = "validation_unique"  # Pick-a-Pic v2's 500 unique prompts, the Diffusion-DPO paper's eval set
PARTI_COLUMN = "Prompt"


def read_prompts(path: str | Path, split: str | None = None) -> list[str]:
    """The prompts at ``path``, stripped, blank ones left out, chosen by what the path is:

    - a folder holding a ``dpojax data prepare`` dataset (its ``OUT``, or any folder below it down to
      ``OUT/pickapic_v2/<config>/1.0.0``): the captions of ``split`` (default ``validation_unique``), each once,
      in the order first seen in the stored split;
    - a folder of ``.json`` files (the HPSv2 benchmark): every file's prompts, files in sorted name order;
    - a ``.json`` file: one HPSv2 benchmark style, a JSON list of prompt strings;
    - a ``.tsv`` file: PartiPrompts, the ``Prompt`` column of a tab-separated file with a header row;
    - any other file: a text file, one prompt per line.

    ``split`` is only for a prepared dataset; giving it with any other kind of path is an error.
    """
    path = Path(path)
    if path.is_dir() and _folder_kind(path) == "dataset":
        return read_split_captions(path, DEFAULT_SPLIT if split is None else split)
    if split is not None and path.exists():
        raise ValueError(f"a split is chosen only in a prepared Pick-a-Pic dataset folder, and {path} is not one")
    if path.is_dir():
        return read_hps_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return read_parti_prompts(path)
    if suffix == ".json":
        return read_hps_prompts(path)
    return read_text_prompts(path)


def read_text_prompts(path: str | Path) -> list[str]:
    """The non-empty lines of a text file, stripped."""
    return _nonempty(_read_text(path).splitlines(), f"prompt file {path}")


def read_parti_prompts(path: str | Path) -> list[str]:
    """The ``Prompt`` column of PartiPrompts.tsv (google-research/parti: columns Prompt, Category, Challenge,
    Note, one header row), in file order."""
    # Split on tabs rather than with the csv module: the file has no quoting, and csv would drop the double
    # quotes of a prompt that starts with one.
    lines = _read_text(path, encoding="utf-8-sig").splitlines()
    header = [name.strip() for name in lines[0].split("\t")] if lines else []
    if PARTI_COLUMN not in header:
        first = repr(lines[0][:80]) if lines else "an empty file"
        raise ValueError(f"prompt file {path} has no '{PARTI_COLUMN}' column in its tab-separated header "
                         f"(first line: {first})")
    column = header.index(PARTI_COLUMN)
    prompts = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if line.strip() and column >= len(fields):
            raise ValueError(f"prompt file {path} line {number} has no '{PARTI_COLUMN}' field")
        prompts.append(fields[column] if line.strip() else "")
    return _nonempty(prompts, f"prompt file {path}")


def read_hps_prompts(path: str | Path) -> list[str]:
    """One HPSv2 benchmark style file (anime.json, concept-art.json, paintings.json, photo.json): a JSON list of
    prompt strings, in list order."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"prompt file {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, list):
        raise ValueError(f"prompt file {path} is not a JSON list of prompt strings (got {type(data).__name__})")
    for index, item in enumerate(data):
        if not isinstance(item, str):
            raise ValueError(f"prompt file {path} is not a JSON list of prompt strings: item {index} is "
                             f"{type(item).__name__}, not a string")
    return _nonempty(data, f"prompt file {path}")


def read_hps_folder(folder: str | Path) -> list[str]:
    """Every ``*.json`` file of a folder read by ``read_hps_prompts``, in sorted file name order (the HPSv2
    benchmark folder: anime, concept-art, paintings, photo)."""
    files = sorted(Path(folder).glob("*.json"))
    if not files:
        raise ValueError(f"prompt folder {folder} holds no .json prompt files")
    return [prompt for file in files for prompt in read_hps_prompts(file)]


def read_split_captions(folder: str | Path, split: str = DEFAULT_SPLIT) -> list[str]:
    """The captions of one split of the ``dpojax data prepare`` dataset in ``folder``, each once, in the order
    first seen in the stored split (the paper samples each unique prompt once)."""
    import tensorflow_datasets as tfds  # heavy, and only this kind of prompt set needs it

    folder = Path(folder)
    found = _dataset_folders(folder)
    if not found:
        raise ValueError(f"prompt folder {folder} holds no `dpojax data prepare` dataset")
    if len(found) > 1:
        names = ", ".join(d.relative_to(folder).as_posix() for d in found)
        raise ValueError(f"prompt folder {folder} holds several prepared datasets ({names}); name the folder of "
                         "the one to read")
    builder = tfds.builder_from_directory(str(found[0]))
    splits = list(builder.info.splits.keys())
    if split not in splits:
        raise ValueError(f"prepared dataset {found[0]} has no split '{split}'; it has {', '.join(splits)}")
    if "caption" not in builder.info.features:
        raise ValueError(f"prepared dataset {found[0]} has no caption feature")
    source = builder.as_data_source(split=split)
    captions = (source[i]["caption"] for i in range(len(source)))
    unique = dict.fromkeys((c.decode("utf-8") if isinstance(c, bytes) else c).strip() for c in captions)
    return _nonempty(list(unique), f"split '{split}' of prepared dataset {found[0]}")


def _folder_kind(folder: Path) -> str:
    """"dataset" (a prepared dataset at or below it) or "json" (HPSv2 benchmark files in it)."""
    if (folder / "dataset_info.json").is_file():  # a dataset's own folder also holds other .json files
        return "dataset"
    if any(folder.glob("*.json")):
        return "json"
    if _dataset_folders(folder):
        return "dataset"
    raise ValueError(f"prompt folder {folder} holds neither .json prompt files (HPSv2 benchmark) nor a "
                     "`dpojax data prepare` dataset")


def _dataset_folders(folder: Path) -> list[Path]:
    """The prepared-dataset folders (those holding ``dataset_info.json``) at or up to three levels below
    ``folder``: ``OUT/pickapic_v2/<config>/<version>``, whichever of those levels ``folder`` is."""
    if (folder / "dataset_info.json").is_file():
        return [folder]
    found = []
    for depth in (1, 2, 3):
        found += [info.parent for info in folder.glob("/".join(["*"] * depth) + "/dataset_info.json")
                  if not info.parent.name.startswith("incomplete.")]  # TFDS's unfinished builds
    return sorted(found)


def _read_text(path: str | Path, encoding: str = "utf-8") -> str:
    try:
        return Path(path).read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ValueError(f"prompt file {path} cannot be read: {err.strerror or err}") from None


def _nonempty(prompts: list[str], what: str) -> list[str]:
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"{what} holds no prompts")
    return prompts
