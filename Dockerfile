# nstap as a container next to the runtimes it watches. Build (see docs/operations.md):
#   docker build -t nstap:local .                                  # FROM the public Debian base
#   docker build --build-arg BASE=nstap-base:local -t nstap:local . # FROM a local rootfs (no registry)
# Two stages: the first builds the venv (Python packages from deploy/requirements.lock, checked
# against its hashes, then nstap with its C scanner and line formatter compiled); the second is the runtime, with
# that venv and none of the compiler, headers or source. Packages come from PyPI, or, for a
# build that cannot reach it, from wheels placed in build/wheels/:
#   pip wheel --require-hashes --no-deps -r deploy/requirements.lock --wheel-dir build/wheels
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# The dependencies first (a layer that changes only with the lock or the wheels). The wildcard
# makes build/wheels optional: COPY fails on a source that matches nothing only when no other does.
COPY deploy/requirements.lock build/wheel[s] /src/deps/
RUN python3 -m venv /opt/nstap/venv \
 && if ls /src/deps/*.whl >/dev/null 2>&1; then from="--no-index --find-links /src/deps"; else from=""; fi \
 && /opt/nstap/venv/bin/pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps $from \
      -r /src/deps/requirements.lock
# nstap itself: no dependency resolved here (they are all in the lock), built with the locked
# setuptools, which then goes (nothing needs it at run time); the C parts are optional in
# setup.py, so the build checks they were compiled.
COPY pyproject.toml setup.py README.md /src/nstap/
COPY daemon /src/nstap/daemon
RUN /opt/nstap/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-index --no-build-isolation /src/nstap \
 && /opt/nstap/venv/bin/pip uninstall --quiet --yes --disable-pip-version-check setuptools \
 && /opt/nstap/venv/bin/python -c "from nstap import exporter; from nstap.netns import scan; assert scan.COMPILED and exporter.COMPILED, 'a C part was not compiled'" \
 && /opt/nstap/venv/bin/pip check --disable-pip-version-check

FROM ${BASE}
# tcpdump and nsenter (util-linux) for captures, iproute2 for evidence, iptables/nftables for the
# NAT monitor, bcc and bpftool for the eBPF collector (it compiles against kernel headers that are
# not in the image: without them it reports itself down and everything else runs).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 tcpdump util-linux iproute2 iptables nftables conntrack python3-bpfcc bpftool ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# The venv only (same base, same /usr/bin/python3, same path), and the one script that links
# Debian's bcc into it.
COPY --from=build /opt/nstap/venv /opt/nstap/venv
COPY deploy/link-bcc.sh /opt/nstap/link-bcc.sh
RUN /opt/nstap/link-bcc.sh /opt/nstap/venv \
 && ln -s /opt/nstap/venv/bin/nstap /usr/local/bin/nstap

# Root, with only the capabilities of the run line (the same as systemd/nstap.service): entering
# other containers' network namespaces (setns) and reading their /proc need them, and an
# unprivileged user cannot hold them across exec without file capabilities.
VOLUME /var/lib/nstap
EXPOSE 9880
ENV NSTAP_IN_CONTAINER=1
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
  CMD ["/opt/nstap/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('NSTAP_HEALTH_URL', 'http://127.0.0.1:9880/healthz'), timeout=4)"]
ENTRYPOINT ["/opt/nstap/venv/bin/nstap"]
CMD ["run", "--data-dir", "/var/lib/nstap"]
