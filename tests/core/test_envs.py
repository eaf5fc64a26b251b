"""Headless GL selection: physics must run on a machine without any GL library."""

from __future__ import annotations

import pytest

from mbplan import envs


def choose(installed: set[str], **environ: str) -> tuple[str, str]:
    return envs.choose_gl(environ, {name: f"lib{name}.so" for name in installed}.get)


def test_prefers_osmesa_then_egl():
    assert choose({"OSMesa", "EGL"}) == ("osmesa", "")
    assert choose({"EGL"}) == ("egl", "")


def test_no_gl_library_disables_rendering_only():
    backend, missing = choose(set())
    assert backend == "disable"
    assert "libosmesa6" in missing


def test_users_choice_kept_when_it_works():
    assert choose({"OSMesa", "EGL"}, MUJOCO_GL="egl") == ("", "")
    assert choose(set(), DISPLAY=":0") == ("", "")


def test_users_backend_without_its_library():
    assert choose({"EGL"}, MUJOCO_GL="osmesa") == (
        "disable",
        "MUJOCO_GL=osmesa but libOSMesa is not installed",
    )


def test_render_without_gl_is_a_one_line_user_error(monkeypatch):
    env = envs.make_env("HalfCheetah-v5", seed=0)
    env.reset(seed=0)
    monkeypatch.setattr(envs, "_GL_MISSING", "no headless GL library found")
    with pytest.raises(envs.UserError, match=r"^cannot render HalfCheetah-v5: no headless GL"):
        envs.render_frame(env)
    assert not envs._is_mujoco(envs.make_env("Pendulum-v1"))  # renders without GL: not refused
