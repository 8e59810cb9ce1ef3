// `sqlx::migrate!` embeds ./migrations when this crate compiles, but on stable Rust a macro
// cannot ask cargo to watch a folder: without this line a new migration file is silently
// missing from an incremental build until some source file changes.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
