#!/bin/busybox sh
# PID 1 of the rmemfs test VM (see vmtool.py): load modules, chroot into the
# host's / (9p, read-only), set up rxe0, run /run/vm/job.sh, report its status.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

R=/newroot
OUT=$R/run/vm

fail() {
  echo "vm-init: $*" >/dev/console
  [ -d "$OUT" ] && echo 125 >"$OUT/rc"
  sync
  poweroff -f
}

while read -r m; do
  insmod "/lib/modules/$m" || fail "insmod $m failed"
done </modules.list

# msize: larger 9p messages make the many small reads of Python imports cheaper.
# cache=loose on the read-only root (the host does not change it under us);
# the output share stays uncached so every write reaches the host at once.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot $R \
  || fail "mounting the host's / over 9p failed"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/shm $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mount -t tmpfs -o mode=755 tmpfs $R/run
mkdir -p $OUT
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none vmout $OUT || fail "mounting vmout failed"
[ -d /sys/fs/fuse/connections ] && mount -t fusectl fusectl $R/sys/fs/fuse/connections 2>/dev/null

i=0
while read -r d; do
  [ -n "$d" ] || continue
  mkdir -p "$R$d" 2>/dev/null   # under a guest tmpfs (/tmp, /run) the mount point must be made first
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=mmap rw$i "$R$d" || fail "mounting $d failed"
  i=$((i + 1))
done <$OUT/rw.list

hostname rmemfs-vm
ip link set lo up
# MTU 9000: rxe then uses a 4096-byte RoCE MTU (1024 at 1500), 4x fewer packets to emulate.
ip link set eth0 mtu 9000
ip link set eth0 up || fail "no eth0"
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
chroot $R rdma link add rxe0 type rxe netdev eth0 >$OUT/rdma.log 2>&1 || fail "rdma link add rxe0 failed: $(cat $OUT/rdma.log)"

chroot $R /bin/sh /run/vm/job.sh </dev/null >$OUT/stdout 2>$OUT/stderr
echo $? >$OUT/rc
sync
poweroff -f
