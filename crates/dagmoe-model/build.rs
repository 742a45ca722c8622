//! Embeds the libtorch library directory as an rpath so binaries and tests
//! built with the `tch` feature run without `LD_LIBRARY_PATH`.

fn main() {
    // torch-sys publishes the directory it linked against (its `links = "tch"` key).
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
