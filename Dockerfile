# nstap as a container next to the runtimes it watches. Build (see the README):
#   docker build -t nstap:local .                                  # FROM the public Debian base
#   docker build --build-arg BASE=nstap-base:local -t nstap:local . # FROM a local rootfs (no registry)
# Python packages come from PyPI, or from wheels placed in build/wheels/ (pip wheel --wheel-dir
# build/wheels .) for a build that cannot reach it.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# tcpdump and nsenter (util-linux) for captures, iproute2 for evidence, iptables/nftables for the
# NAT monitor, bcc and bpftool for the eBPF collector (it compiles against kernel headers that are
# not in the image: without them it reports itself down and everything else runs).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv tcpdump util-linux iproute2 iptables nftables conntrack python3-bpfcc bpftool ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY . /src
RUN python3 -m venv /opt/nstap/venv \
 && if [ -d /src/build/wheels ]; then \
      /opt/nstap/venv/bin/pip install --no-cache-dir --no-index --find-links /src/build/wheels nstap; \
    else \
      /opt/nstap/venv/bin/pip install --no-cache-dir /src; \
    fi \
 && /src/deploy/link-bcc.sh /opt/nstap/venv \
 && ln -s /opt/nstap/venv/bin/nstap /usr/local/bin/nstap \
 && rm -rf /src

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
