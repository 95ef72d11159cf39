"""The suite's own set-up (conftest.py, pytest.ini)."""
import pytest


@pytest.mark.ray
def test_the_tests_that_start_ray_form_one_xdist_group(request):
    """Under pytest-xdist's --dist loadgroup (pytest.ini), the tests that start Ray carry the
    group "ray" in their node id, by which one worker runs them one after another (a pytest whose
    node ids drop the group, as 9.2 does with xdist 3.8, ran them on both workers at once)."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run under pytest-xdist's --dist loadgroup")
    assert request.node.nodeid.endswith("@ray"), request.node.nodeid
