"""Every table in papers/ is what its kept result regenerates (experiments/paper.py)."""

import json
import shutil

import pytest

from experiments import paper


def test_every_paper_block_equals_what_its_kept_result_regenerates():
  problems = paper.check()
  assert not problems, "\n".join(problems)


def test_every_kept_result_is_shown_or_named_by_a_block():
  named = {key for block in paper.blocks() for key in paper.matching_keys(block.key)}
  kept = {p.stem for p in paper.RESULTS.glob("*.json")}
  unused = sorted(kept - named)
  assert not unused, f"kept results no page block shows: {unused}"


def _first_numeric_cell(body: str) -> tuple[str, str]:
  for line in body.splitlines():
    if line.startswith("|") and not line.startswith("|---"):
      for cell in line.strip("|").split("|"):
        cell = cell.strip()
        if cell and cell[0].isdigit():
          return line, cell
  raise AssertionError("no numeric table cell")


def test_a_hand_edited_table_cell_fails_the_check(tmp_path):
  block = next(b for b in paper.blocks() if "|" in b.body)
  page = tmp_path / block.page.name
  shutil.copy(block.page, page)
  assert paper.check([page]) == []
  line, cell = _first_numeric_cell(block.body)
  edited_cell = cell[:-1] + ("0" if cell[-1] != "0" else "1")
  text = page.read_text()
  page.write_text(text.replace(line, line.replace(cell, edited_cell, 1), 1))
  problems = paper.check([page])
  assert len(problems) == 1 and "differs from its kept result" in problems[0]
  assert edited_cell in problems[0]
  # fill restores what the result regenerates.
  paper.fill([block.key], pages=[page])
  assert paper.check([page]) == []


def test_legacy_blocks_and_unknown_results_are_refused(tmp_path):
  page = tmp_path / "x.md"
  page.write_text("<!-- table:old -->\n| a |\n<!-- /table:old -->\n")
  with pytest.raises(paper.PaperError, match="not a paper block"):
    paper.blocks([page])
  page.write_text("<!-- paper:no_such_result#t -->\n<!-- /paper:no_such_result#t -->\n")
  (problem,) = paper.check([page])
  assert "does not exist" in problem
  with pytest.raises(paper.PaperError, match="result key"):
    paper.check_key("../escape")


def test_a_result_key_with_a_glob_is_refused_before_anything_runs(tmp_path, capsys):
  """'*' belongs to block keys only: a result kept as 'fedavg.*' would be shown by every block
  pattern it matches."""
  for key in ("fedavg.*", "*", "kquant.digits_*_a0.1"):
    with pytest.raises(paper.PaperError, match=r"result key .*'\*' only in a page block's key"):
      paper.check_key(key)
    with pytest.raises(paper.PaperError, match="result key"):
      paper.keep(key, module="experiments.fedavg", page="papers/fedavg.md", command="x",
                 summary={})
  assert not list(paper.RESULTS.glob("*[*]*.json"))
  from experiments import run as launcher  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit):
    launcher.parse_args(["configs/fedavg/smoke.py", "--paper", "fedavg.*"])
  assert "--paper: result key 'fedavg.*'" in capsys.readouterr().err
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser()
  paper.add_paper_argument(parser, default_key="bench_x.cpu")
  with pytest.raises(SystemExit):
    parser.parse_args(["--paper", "bench_x.*"])
  assert "result key 'bench_x.*'" in capsys.readouterr().err
  assert parser.parse_args(["--paper"]).paper == "bench_x.cpu"
  assert parser.parse_args(["--paper", "bench_x.gpu"]).paper == "bench_x.gpu"
  # Block keys still glob over kept results.
  assert len(paper.matching_keys("nonlocal_cnn.denoise_sigma*")) > 1


# Kept results converted from the result files benchmarks wrote before the paper path: they
# record the machine and jax only (their environment's note says so) until their benchmark is
# rerun with --paper (bench_kquant.gpu needs a GPU). A rerun records every version; then its
# name leaves this list (the test below fails until it does).
CONVERTED = ("bench_kquant.gpu",)


def test_kept_results_record_their_command_and_environment():
  for path in sorted(paper.RESULTS.glob("*.json")):
    result = json.loads(path.read_text())
    assert result["format"] == paper.FORMAT, path
    assert result["key"] == path.stem, path
    assert result["command"].startswith("python -m experiments."), path
    assert (paper.ROOT / result["page"]).is_file(), path
    environment = result["environment"]
    assert isinstance(environment.get("jax"), str), f"{path}: environment records no jax version"
    if path.stem in CONVERTED:
      assert "numpy" not in environment, f"{path} records its versions: drop it from CONVERTED"
      assert "converted from the pre-paper-path result file" in environment["note"], path
    else:
      assert isinstance(environment.get("numpy"), str), \
          f"{path}: environment records no numpy version"
  assert all((paper.RESULTS / f"{key}.json").is_file() for key in CONVERTED)
