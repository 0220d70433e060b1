#!/bin/bash
# Set up overlayfuse for development on Debian 12: system packages (only those missing), a venv
# in .venv made from Debian's python3, an editable install with the test and bench extras, and
# pyfuse3 rebuilt with our patch (tools/pyfuse3/: zero-message opens; when it cannot be built,
# the stock pyfuse3 stays and overlayfuse works, slower).
# Idempotent and quiet; prints errors (with the failing command's output) and exits non-zero.
# As root it also links /usr/local/bin/overlayfuse to the venv's script, so that
# `mount -t fuse.overlayfuse` (whose helper runs with a fixed PATH) finds it.
# VENV=DIR sets up another venv (no link); OVERLAYFUSE_STOCK_PYFUSE3=1 keeps stock pyfuse3.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
venv=${VENV:-.venv}
log=$(mktemp /tmp/overlayfuse-setup.XXXXXX)
trap 'rm -f "$log"' EXIT

fail() { echo "setup: $1" >&2; [ -s "$log" ] && tail -n 30 "$log" >&2; exit 1; }

# podman, runc and busybox-static are for tests/test_podman.py (podman as the client of the
# mount program): about 22 MB to download, 100 MB on disk; patch applies our pyfuse3 patch;
# uidmap (newuidmap/newgidmap) maps a user's subordinate IDs into the sandbox's user namespace;
# zstd unpacks .tar.zst for store init --from-tar; libcap2-bin's setcap makes test archives;
# debootstrap makes tests/test_debian_root.py's Debian 12 root (cached in /var/tmp); the tests
# also use xz-utils (tar --xz) and procps (pgrep), which a minimal Debian lacks
# skopeo and docker-registry are for tests/test_store_oci*.py (store export, init --from-image:
# skopeo moves the images, a local registry on 127.0.0.1 receives them)
pkgs=(fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev attr fuse-overlayfs util-linux
      patch podman runc busybox-static uidmap zstd libcap2-bin debootstrap xz-utils procps
      skopeo docker-registry)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || fail "missing Debian packages: ${missing[*]} (run this script as root, or install them)"
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q </dev/null >"$log" 2>&1 || fail "apt-get update failed"
  apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >"$log" 2>&1 \
    || fail "apt-get install ${missing[*]} failed"
fi

# fusermount3 (unprivileged mounts and unmounts) reads /etc/mtab, which a booted Debian has as
# a link to /proc/self/mounts; a minimal image or chroot may lack it
if [ ! -e /etc/mtab ] && [ "$(id -u)" = 0 ]; then
  ln -sf ../proc/self/mounts /etc/mtab
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  /usr/bin/python3 -m venv "$venv" >"$log" 2>&1 || fail "python3 -m venv $venv failed"
fi

# reinstall only when the package metadata changed (the install is editable: code changes need
# nothing) or the install is broken
stamp=$venv/.overlayfuse-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat $stamp 2>/dev/null)" != "$want" ] || ! "$venv/bin/python" -c 'import overlayfuse, pyfuse3, trio, pytest' 2>/dev/null; then
  echo "setup: installing overlayfuse into $venv (pip install -e '.[test,bench]')"
  if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check --retries 2 --timeout 20 \
       -e '.[test,bench]' </dev/null >"$log" 2>&1; then
    # No PyPI (offline, or a proxy whose certificate this machine does not trust): fall back to
    # Debian's builds of the dependencies, seen through the venv, and install only our package.
    grep -qiE 'ssl|connection|resolve|no matching distribution|could not find a version' "$log" \
      || fail "pip install -e '.[test,bench]' failed"
    [ "$(id -u)" = 0 ] || fail "PyPI unreachable and not root: cannot install Debian's python3-pyfuse3 etc."
    echo "setup: PyPI unreachable; using Debian's python3-pyfuse3, python3-trio, python3-pytest, ..."
    export DEBIAN_FRONTEND=noninteractive
    deb=(python3-pyfuse3 python3-trio python3-pytest python3-hypothesis python3-matplotlib python3-setuptools python3-wheel)
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${deb[@]}"; } </dev/null >"$log" 2>&1 \
      || fail "apt-get install ${deb[*]} failed"
    sed -i 's/^include-system-site-packages = false/include-system-site-packages = true/' "$venv/pyvenv.cfg"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-index --no-deps \
      --no-build-isolation -e . </dev/null >"$log" 2>&1 || fail "pip install --no-index -e . failed"
  fi
  echo "$want" > $stamp
fi

# pyfuse3 with our patch, from the pinned sdist; the local version names the patch, so a
# changed patch is rebuilt and an unchanged one never
PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
# the patches, applied in this order: zero-message opens, the request loop's drain, the umask,
# fallocate, declining asynchronous direct I/O, the request loop's poll() when idle and its spin,
# plain READDIR where the kernel will not use the attributes
patch_files=(tools/pyfuse3/zero-message-opens.patch tools/pyfuse3/request-loop-drain.patch
             tools/pyfuse3/dont-mask.patch tools/pyfuse3/fallocate.patch
             tools/pyfuse3/async-dio.patch tools/pyfuse3/request-loop-poll.patch
             tools/pyfuse3/request-loop-spin.patch tools/pyfuse3/readdir-plain.patch)
patched="$PYFUSE3_VERSION+ovf.$(cat "${patch_files[@]}" | sha256sum | cut -c1-10)"

build_patched_pyfuse3() {
  local d rc=0 sdist
  d=$(mktemp -d /tmp/overlayfuse-pyfuse3.XXXXXX)
  sdist="$d/pyfuse3-$PYFUSE3_VERSION.tar.gz"
  { "$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
      --no-binary pyfuse3 --retries 2 --timeout 20 "pyfuse3==$PYFUSE3_VERSION" -d "$d" \
    && echo "$PYFUSE3_SHA256  $sdist" | sha256sum -c --quiet - \
    && tar -xzf "$sdist" -C "$d" \
    && rm -f "$d/pyfuse3-$PYFUSE3_VERSION/src/pyfuse3/__init__.c" \
    && (for p in "${patch_files[@]}"; do patch -s -p1 -d "$d/pyfuse3-$PYFUSE3_VERSION" < "$p" || exit 1; done) \
    && SETUPTOOLS_SCM_PRETEND_VERSION="$patched" "$venv/bin/python" -m pip install -q \
         --disable-pip-version-check --no-deps --force-reinstall "$d/pyfuse3-$PYFUSE3_VERSION"
  } </dev/null >"$log" 2>&1 || rc=$?
  rm -rf "$d"
  return $rc
}

have=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))' 2>/dev/null || true)
if [ "${OVERLAYFUSE_STOCK_PYFUSE3:-0}" != 1 ] && [ "$have" != "$patched" ]; then
  echo "setup: building pyfuse3 $PYFUSE3_VERSION with ${patch_files[*]}"
  if ! build_patched_pyfuse3; then
    echo "setup: the patched pyfuse3 could not be built; overlayfuse uses pyfuse3 $have" \
         "as it is (classic opens, slower). The build said:" >&2
    tail -n 5 "$log" >&2
  fi
fi

link=/usr/local/bin/overlayfuse
if [ "$(id -u)" = 0 ] && [ "$venv" = .venv ] && [ -x .venv/bin/overlayfuse ]; then
  # the checkout being set up is the one mount(8) must run; never replace a real file
  if [ -L "$link" ] || [ ! -e "$link" ]; then
    ln -sfn "$repo/.venv/bin/overlayfuse" "$link"
  fi
fi
exit 0
