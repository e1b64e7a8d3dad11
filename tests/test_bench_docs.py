"""bench/_docs.py: a benchmark's table replaces its own section of a docs page and nothing else."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._docs import write_section  # noqa: E402


def test_a_section_is_replaced_in_place_with_a_blank_line_before_the_next_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n## Table (bench)\n\nold rows\n\n## Notes\n\nkept\n")
    write_section(page, "## Table (bench)", "## Table (bench)\n\nnew rows\n", "# Page\n\n")
    assert page.read_text() == "# Page\n\n## Table (bench)\n\nnew rows\n\n## Notes\n\nkept\n"
    write_section(page, "## Other (bench)", "## Other (bench)\n\nrows\n", "# Page\n\n")  # absent: appended
    assert page.read_text().endswith("kept\n\n## Other (bench)\n\nrows\n")
