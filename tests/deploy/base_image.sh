#!/usr/bin/env bash
# Makes a local `debian:bookworm-slim` for podman without a registry:
# debootstrap --variant=minbase from this machine's configured Debian mirror,
# trimmed like the official slim image, then `podman import`. The rootfs
# tarball is cached (EMOSERVE_IMAGE_CACHE, default /var/cache/emoserve) so a
# new podman store costs an import, not a debootstrap.
#   tests/deploy/base_image.sh            prints the image name when ready
set -euo pipefail

image="docker.io/library/debian:bookworm-slim"
cache_dir="${EMOSERVE_IMAGE_CACHE:-/var/cache/emoserve}"
tarball="$cache_dir/debian-bookworm-minbase.tar"

if podman image exists "$image"; then
  echo "$image"
  exit 0
fi

# The first Debian archive URI this machine's apt is configured with (deb822
# .sources or one-line .list format), skipping the security archive.
debian_mirror() {
  local files=(/etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list)
  local f
  for f in "${files[@]}"; do
    [[ -f "$f" ]] || continue
    if [[ "$f" == *.sources ]]; then
      awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' "$f"
    else
      awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' "$f"
    fi
  done | grep -v -- '-security' | grep -i debian | head -n1
}

if [[ ! -s "$tarball" ]]; then
  mirror="$(debian_mirror)"
  if [[ -z "$mirror" ]]; then
    echo "base_image: no Debian mirror in /etc/apt sources" >&2
    exit 1
  fi
  mkdir -p "$cache_dir"
  # A killed earlier run leaves its half-made root behind.
  rm -rf "$cache_dir"/rootfs.*
  rootfs="$(mktemp -d "$cache_dir/rootfs.XXXXXX")"
  trap 'rm -rf "$rootfs"' EXIT
  echo "base_image: debootstrap bookworm from $mirror" >&2
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >&2
  # As in the official image: the updates and security suites, no apt lists
  # or package caches, and dpkg leaving out docs, man pages and locales.
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi

podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' "$tarball" "$image" >&2
echo "$image"
