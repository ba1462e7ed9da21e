"""Data moves one way through the code: no module imports, directly or through others, a
module that imports it back; and no stage package (receiver/callback, sources, inbox, ...)
depends on one that depends on it. Every import counts, at the top of a module, inside a
function or under TYPE_CHECKING: an import moved out of sight is still a cycle."""

import grimp
import pytest

ROOTS = ("receiver", "handlers")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*ROOTS, cache_dir=None)


def cycles(graph: grimp.ImportGraph) -> list[str]:
    """Each import that closes a cycle, with the way back, shortest first."""
    found = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                found.append(" -> ".join((importer, *back)))
    return found


def test_no_module_imports_back_what_imports_it(graph):
    assert cycles(graph) == []


def stage_of(module: str) -> str:
    """receiver.inbox.sqlite -> receiver.inbox; handlers.sql -> handlers."""
    return ".".join(module.split(".")[:2]) if module.startswith("receiver.") else "handlers"


def test_stages_depend_one_way(graph):
    stages = grimp.ImportGraph()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            if stage_of(importer) != stage_of(imported):
                stages.add_import(importer=stage_of(importer), imported=stage_of(imported))
    assert cycles(stages) == []
