"""sft_qwen2.py as users run it: bad input exits 2 with one line; run.sh launches 2 CPU processes."""

import json

import pytest

import sft_qwen2
from conftest import run_cli


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def bad_input_cases(tmp):
    good = json.dumps({"query": "q", "answer": "a"})
    return [
        (write(tmp / "malformed.jsonl", good + "\n" + good + "\n{\"query\": \"q\", \"answer\": \n"),
         "malformed.jsonl: line 3: malformed JSON"),
        (write(tmp / "missing.jsonl", good + "\n" + json.dumps({"query": "q"}) + "\n"),
         "missing.jsonl: line 2: missing key 'answer'"),
        (write(tmp / "nonstring.jsonl", json.dumps({"messages": [{"role": "user", "content": "x"},
                                                                  {"role": "assistant", "content": "y"}]}) + "\n"
               + json.dumps({"messages": [{"role": "user", "content": 5},
                                          {"role": "assistant", "content": "y"}]}) + "\n"),
         "nonstring.jsonl: line 2: key 'messages[0]'.content: expected a string, got int"),
        (write(tmp / "role.jsonl", good + "\n\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n"),
         "role.jsonl: line 3: key 'messages[0]': unknown role 'bot'"),
        (write(tmp / "empty.jsonl", ""), "empty.jsonl: empty file"),
        (str(tmp / "nowhere.jsonl"), "nowhere.jsonl: no such file or folder"),
    ]


def test_each_bad_input_exits_2_with_one_line(sft_demo, tmp_path, capsys):
    for path, message in bad_input_cases(tmp_path):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            sft_qwen2.main(["--model_name_or_path", sft_demo[0], "--train_file", path, "--use_cpu",
                            "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2, path
        assert err[-1].startswith("error: ") and message in err[-1], (message, err[-1])


def test_bad_input_from_the_command_line_has_no_traceback(sft_demo, tmp_path):
    path, message = bad_input_cases(tmp_path)[1]
    res = run_cli(["bash", "run.sh", "sft_qwen2.py", "--model_name_or_path", sft_demo[0], "--train_file", path,
                   "--output_dir", str(tmp_path / "o")])
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and message in res.stderr


def test_run_sh_demo_two_processes(tmp_path):
    res = run_cli(["bash", "run.sh", "sft_qwen2.py", "--demo", "--output_dir", str(tmp_path / "demo-out")],
                  env={"NPROC_PER_NODE": "2"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "--nproc_per_node 2" in res.stderr
    out = res.stdout
    assert "loss only on the text inside" in out and "{'loss'" in out and "summary:" in out
    assert out.count("summary:") == 1  # only rank 0 prints
    assert (tmp_path / "demo-out" / "model.safetensors").is_file()


def test_run_sh_passes_arguments_through_unchanged(tmp_path):
    script = tmp_path / "echo_args.py"
    script.write_text("import json, os, sys\nprint(json.dumps([os.environ['WORLD_SIZE'], sys.argv[1:]]))\n"
                      "sys.exit(3)\n")
    res = run_cli(["bash", "run.sh", str(script), "a b", 'quote"d', "--flag=x y", ""], env={"NPROC_PER_NODE": "1"})
    assert res.returncode == 3  # the script's own exit code, not torchrun's
    assert json.loads(res.stdout.strip().splitlines()[0]) == ["1", ["a b", 'quote"d', "--flag=x y", ""]]


def test_bad_record_found_by_a_worker_process_still_names_the_line(sft_demo, tmp_path, capsys):
    good = json.dumps({"query": "q", "answer": "a"})
    path = write(tmp_path / "late.jsonl", "\n".join([good] * 9 + [json.dumps({"query": "q", "answer": None})]) + "\n")
    with pytest.raises(SystemExit) as exit_:
        sft_qwen2.main(["--model_name_or_path", sft_demo[0], "--train_file", path, "--use_cpu",
                        "--preprocessing_num_workers", "2", "--output_dir", str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert "late.jsonl: line 10: missing key 'answer'" in capsys.readouterr().err.strip().splitlines()[-1]
