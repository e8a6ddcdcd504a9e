"""What every CLI test asserts of a refused command: one line, exit code 2."""


def one_line_error(result, *needles):
    """The whole output is one 'Error: ...' line holding every needle; exit code 2."""
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("Error:") and len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, message


def ends_in_one_line_error(result, *needles):
    """A command that ran for a while (its progress printed) and then failed: its last line is the
    one-line error, with no traceback anywhere; exit code 2."""
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error:") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in last, last
