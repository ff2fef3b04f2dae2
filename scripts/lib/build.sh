# Sourced by the scripts: the release build as shipped.
#
# The `overlay` CNI plugin is linked statically (glibc's static-pie): the runtime starts it once per
# pod ADD and DEL, and a static binary skips the dynamic loader, about 0.3 ms of a 2-3 ms call.
# Only the plugin: overlayd resolves etcd host names through glibc's NSS, which wants the shared
# libc. `cargo rustc` passes the flag to the plugin's final link alone, so no dependency rebuilds.
# (A later plain `cargo build --release` relinks the plugin dynamically; it still works, slower.)
build_plugin_release() {
  cargo rustc --release --locked -p overlay-cni --bin overlay -q -- -C target-feature=+crt-static
}

# Everything but the plugin through cargo build, so the plugin is linked once, statically.
build_release() {
  cargo build --release --locked --workspace --exclude overlay-cni --bins -q
  build_plugin_release
}
