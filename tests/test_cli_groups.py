"""``mqchat group ...`` and groups in ``send`` / ``listen``, run as a user would
(the installed executable against ``mqchat up``, as in tests/test_cli.py)."""

from __future__ import annotations

import re

from .test_cli import PASSWORDS, Up, run_mqchat, up  # noqa: F401  (up: the fixture)


def test_a_group_from_the_command_line(up: Up) -> None:  # noqa: F811
    PASSWORDS.setdefault("carol", "carol-secret")  # test_cli.py's Up reads them here
    up.add_users("alice", "bob", "carol")

    def mqchat(*args: str, user: str = "alice") -> tuple[int, str, str]:
        env = up.env(user) | {"MQCHAT_API_URL": f"http://127.0.0.1:{up.api_port}"}
        result = run_mqchat(*args, env=env)
        return result.returncode, result.stdout, result.stderr

    code, out, err = mqchat("group", "create", "climbing", "--member", "bob")
    assert code == 0, err
    created = re.fullmatch(r"(c_\w+)\n", out)
    assert created is not None, out
    group = created.group(1)

    # bob's listen starts after the group's first seq: it shows from #2 on.
    bob = up.listen("bob", "--count", "3", "--device", "bob-listen")
    alice = up.listen("alice", "--receipts", "--device", "alice-listen")
    assert mqchat("group", "add", group, "carol")[:2] == (0, f"added {group} #2\n")
    assert mqchat("send", "--conversation", group, "saturday?")[:2] == (0, f"sent {group} #3\n")
    assert mqchat("group", "rename", group, "climbing club")[:2] == (0, f"renamed {group} #4\n")
    code, lines = bob.finish()
    assert code == 0
    assert lines == [
        f"[{group} #2] * alice added carol",
        f"[{group} #3] alice: saturday?",
        f'[{group} #4] * alice renamed the group to "climbing club"',
    ]
    # bob's listen acked "delivered": alice sees one of two.
    alice.stdout.wait_for(rf"^\[{group} #3\] delivered to 1 of 2, read by 0 of 2$")

    code, out, _ = mqchat("group", "members", group)
    assert (code, out) == (
        0,
        "alice admin since #1\nbob member since #1\ncarol member since #2\n",
    )
    code, out, _ = mqchat("group", "list", user="bob")
    assert (code, out) == (0, f"{group} climbing club (3 members)\n")

    code, _, err = mqchat("group", "add", group, "alice", user="bob")
    assert (code, err.split(":")[0]) == (1, "error forbidden")
    assert mqchat("group", "promote", group, "bob")[:2] == (0, f"promoted {group} #5\n")
    assert mqchat("group", "demote", group, "alice", user="bob")[:2] == (0, f"demoted {group} #6\n")
    assert mqchat("group", "leave", group, user="carol")[:2] == (0, f"left {group} #7\n")
    assert mqchat("group", "remove", group, "alice", user="bob")[:2] == (0, f"removed {group} #8\n")
    code, out, _ = mqchat("group", "list", user="carol")
    assert (code, out) == (0, f"{group} climbing club (left)\n")
    code, _, err = mqchat("group", "members", group, user="carol")
    assert (code, err.split(":")[0]) == (1, "error unknown_conversation")
    alice.process.terminate()
    alice.finish()
