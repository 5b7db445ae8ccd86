"""Builds the C extension semex._engine; metadata lives in pyproject.toml.

libcurl is found with `pkg-config libcurl`, then `curl-config` (Debian: libcurl4-openssl-dev).
Build switches, for development and CI only (never set for a user's install):
  SEMEX_WERROR=1    compile with -Werror
  SEMEX_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer build
  SEMEX_DEBUG=1     -O0 -g
"""
import glob
import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup


def _run(cmd):
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def libcurl_flags():
    if shutil.which("pkg-config"):
        cflags = _run(["pkg-config", "--cflags", "libcurl"])
        libs = _run(["pkg-config", "--libs", "libcurl"])
        if cflags is not None and libs is not None:
            return shlex.split(cflags), shlex.split(libs)
    if shutil.which("curl-config"):
        cflags = _run(["curl-config", "--cflags"])
        libs = _run(["curl-config", "--libs"])
        if cflags is not None and libs is not None:
            return shlex.split(cflags), shlex.split(libs)
    sys.exit(
        "semex needs the libcurl development files, found through pkg-config or curl-config.\n"
        "On Debian/Ubuntu: apt-get install libcurl4-openssl-dev pkg-config"
    )


cflags, libs = libcurl_flags()
compile_args = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-fvisibility=hidden"] + cflags
link_args = ["-pthread"]
if os.environ.get("SEMEX_WERROR") == "1":
    compile_args.append("-Werror")
if os.environ.get("SEMEX_DEBUG") == "1" or os.environ.get("SEMEX_SANITIZE") == "1":
    compile_args += ["-O1", "-g", "-fno-omit-frame-pointer"]
else:
    compile_args += ["-O2"]
if os.environ.get("SEMEX_SANITIZE") == "1":
    compile_args += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    link_args += ["-fsanitize=address,undefined"]

sources = sorted(glob.glob("csrc/*.c"))

setup(
    ext_modules=[
        Extension(
            "semex._engine",
            sources=sources,
            depends=sorted(glob.glob("csrc/*.h")),
            extra_compile_args=compile_args,
            extra_link_args=link_args + libs,
        )
    ],
)
