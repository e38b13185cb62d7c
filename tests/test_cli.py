"""milo-jax command line: generate and eval on a tiny saved Mixtral with a WordLevel tokenizer.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from milo_jax.cli import COMMANDS, main
from milo_jax.eval import perplexity
from milo_jax.serve import generate, load_tokenizer
from tests.test_serve_mixtral import SENTENCES, mixtral, mixtral_dir  # noqa: F401  (fixtures)


def test_generate_prints_the_library_result(mixtral, mixtral_dir, capsys):  # noqa: F811
    prompt = "the quick brown fox"
    status = main(["generate", "--model", mixtral_dir, "--prompt", prompt, "--max-new-tokens", "6",
                   "--temperature", "0.7", "--top-p", "0.9", "--seed", "4", "--json"])
    assert status == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tok = load_tokenizer(mixtral_dir)
    expected = generate(mixtral, [prompt], max_new_tokens=6, temperature=0.7, top_p=0.9, seed=4, tokenizer=tok)
    assert line["tokens"] == expected.tokens[0] and line["text"] == expected.text[0]
    assert line["finish_reason"] == expected.finish_reasons[0] and line["prompt"] == prompt

    assert main(["generate", "--model", mixtral_dir, "--prompt", prompt, "--max-new-tokens", "3"]) == 0
    greedy = generate(mixtral, [prompt], max_new_tokens=3, tokenizer=tok)
    assert capsys.readouterr().out.rstrip("\n").splitlines()[-1] == greedy.text[0]


def test_eval_prints_perplexity_and_json(mixtral, mixtral_dir, tmp_path, capsys):  # noqa: F811
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n".join(SENTENCES * 3), encoding="utf-8")
    status = main(["eval", "--model", mixtral_dir, "--text", str(text_file), "--window", "16", "--batch-size", "2"])
    assert status == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("perplexity ")
    record = json.loads(out[-1])
    tokens = load_tokenizer(mixtral_dir).encode(text_file.read_text(encoding="utf-8"))
    expected = perplexity(mixtral, tokens, window=16)
    assert record["ppl"] == pytest.approx(expected.ppl, rel=1e-5)
    assert record["num_tokens"] == expected.num_tokens == expected.num_windows * 15
    assert record["window"] == 16 and record["model"] == mixtral_dir


def test_bad_input_exits_with_status_2(mixtral_dir, tmp_path, capsys):  # noqa: F811
    text_file = tmp_path / "short.txt"
    text_file.write_text("the lazy dog", encoding="utf-8")
    assert main(["eval", "--model", mixtral_dir, "--text", str(text_file), "--window", "64"]) == 2
    assert "less than one window" in capsys.readouterr().err
    assert main(["generate", "--model", mixtral_dir, "--prompt", "a", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["eval", "--model", mixtral_dir, "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "a"]) == 2
    assert "nothing" in capsys.readouterr().err


def test_parser_lists_commands_and_requires_one(capsys):
    assert {"generate", "eval"} <= set(COMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "generate" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    repo_root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "milo_jax", "eval", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=repo_root, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert "--window" in proc.stdout
