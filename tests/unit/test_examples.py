"""Finding the docs' examples and checking an answer against them (tools/examples.py)."""

from pathlib import Path

from tools.examples import find_examples, missing_fields, rewrite_ports

PAGE = """# A page

```sh
# a description, not output
curl -s -X POST localhost:8000/keys -H 'content-type: application/json' \\
     -d '{"key": "a#b", "value": 1}'
# {"key":"a#b","value":1,"version":1,
#  "acks":3}
curl -s localhost:8003/keys/a%23b      # {"key":"a#b","version":1}
make run
```

<!-- example: not run (needs a frozen follower) -->
```sh
curl -s 'localhost:8000/keys?w=5' -d '{}'
# 503 {"error":"...","acks":4}
```

```python
print("hello")
```
"""


def examples(tmp_path: Path):
    path = tmp_path / "page.md"
    path.write_text(PAGE)
    return find_examples(path, tmp_path)


def test_curl_commands_their_output_and_python_blocks_are_found(tmp_path: Path):
    found = examples(tmp_path)
    assert [(e.kind, e.line) for e in found] == [
        ("curl", 5),
        ("curl", 9),
        ("curl", 15),
        ("python", 20),
    ]
    first, second, frozen, python = found
    assert first.code.endswith("""-d '{"key": "a#b", "value": 1}'""")  # a # inside quotes stays
    assert first.fields == ["key", "value", "version", "acks"] and first.status is None
    assert second.code == "curl -s localhost:8003/keys/a%23b" and second.fields == [
        "key",
        "version",
    ]
    assert frozen.not_run == "needs a frozen follower" and frozen.status == 503
    assert first.not_run is None and python.code == 'print("hello")'


def test_a_renamed_field_is_missing_from_the_answer():
    shown = ["key", "value", "version"]
    assert missing_fields(shown, '{"key": "a", "value": 1, "version": 2}') == []
    assert missing_fields(shown, '{"key": "a", "value": 1, "versoin": 2}') == ["version"]
    stream = 'id: 7\nevent: put\ndata: {"key": "a", "value": {"rgb": 1}, "version": 7}\n'
    assert missing_fields(["key", "rgb", "version"], stream) == []


def test_documented_ports_become_the_test_clusters():
    ports = {8000: "127.0.0.1:9100", 8003: "127.0.0.1:9103"}
    assert rewrite_ports("curl localhost:8000/x 127.0.0.1:8003/y", ports) == (
        "curl 127.0.0.1:9100/x 127.0.0.1:9103/y"
    )
