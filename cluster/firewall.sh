#!/bin/sh
# Keep a Ray node's ports to its cluster network: `firewall.sh CIDR` (e.g. 10.0.0.0/24).
#
# Ray's daemons (GCS, raylet, object manager, dashboard agent, workers) listen on every interface
# of a node, on fixed and random ports, and Ray has no setting to bind them elsewhere. This
# nftables table, applied on every node by cluster/local.yaml's setup, accepts what comes from
# loopback, from the cluster network CIDR and SSH (port 22: `ray up` and `ray dashboard` come that
# way), and drops every other TCP and UDP packet to the node. It replaces only its own table
# (`inet dard_cluster`), so it can be re-run and leaves other rules alone. Needs root and nft
# (Debian/Ubuntu: nftables).
set -eu
cidr=${1:?usage: firewall.sh CIDR   (the cluster network, e.g. 10.0.0.0/24)}
nft -f - <<RULES
table inet dard_cluster
delete table inet dard_cluster
table inet dard_cluster {
  chain input {
    type filter hook input priority 0; policy accept;
    iif lo accept
    ct state established,related accept
    ip saddr $cidr accept
    tcp dport 22 accept
    meta l4proto { tcp, udp } drop
  }
}
RULES
