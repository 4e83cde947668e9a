//! `fibecfed`: the command-line front end; everything lives in [`fibecfed_sim::cli`].

fn main() -> std::process::ExitCode {
    fibecfed_sim::cli::main()
}
