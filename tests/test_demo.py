"""`python -m harmonizer_fast.demo` replaces its own outputs on a rerun, never someone else's."""
import json

import pytest

from harmonizer_fast import demo


def test_the_demo_refuses_a_folder_with_a_summary_it_did_not_write(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"model": "resnet50", "alignment_score": 0.4}))  # an eval-clickme result
    with pytest.raises(FileExistsError, match="was not written by this demo"):
        demo.run_demo(out=str(tmp_path), progress=False)  # refused before any model is loaded
    assert json.loads(summary.read_text())["model"] == "resnet50"
    summary.write_text(json.dumps({k: 0 for k in demo._DEMO_SUMMARY_KEYS}))
    demo._refuse_foreign_outputs(tmp_path)  # its own earlier summary: a rerun may replace it
