//! The verifier's view of both programs: they load, and their cost stays within a budget that
//! leaves a wide margin under the kernel's limits, so a change that makes verification explode
//! (or the program balloon) fails here, not on a compute node.

use sg_common::*;
use sg_user::datapath::{Datapath, LoadOptions};

/// The kernel refuses a program whose verification processes more instructions than this
/// (BPF_COMPLEXITY_LIMIT_INSNS).
const KERNEL_LIMIT: u32 = 1_000_000;
/// sg's budget: a tenth of the limit. Today each program needs under 2% of it.
const VERIFIED_BUDGET: u32 = KERNEL_LIMIT / 10;
/// Translated (post-verifier) program size budget, bytes; today about 32 KiB.
const XLATED_BUDGET: u32 = 64 * 1024;

#[test]
fn both_programs_load_within_budget() {
    let mut dp = Datapath::load(&LoadOptions::default()).expect("the verifier accepts both programs");
    for name in [PROG_FROM_VM, PROG_TO_VM] {
        let info = dp.program(name).unwrap().info().unwrap();
        // bpf_prog_info.verified_insns: the verifier's insn_processed, the count the 1M limit
        // applies to, summed over the main program and every global function (Linux 5.16+).
        let verified = info
            .verified_instruction_count()
            .expect("kernel reports verified_insns");
        let xlated = info.size_translated().expect("kernel reports the xlated size");
        let jited = info.size_jitted();
        eprintln!(
            "{name}: {verified} instructions processed by the verifier ({:.1}% of {KERNEL_LIMIT}), \
             {xlated} bytes xlated ({} insns), {jited} bytes jited",
            verified as f64 * 100.0 / KERNEL_LIMIT as f64,
            xlated / 8
        );
        assert!(
            verified > 1000,
            "{name}: {verified} processed insns looks like a stub, not the datapath"
        );
        assert!(
            verified < VERIFIED_BUDGET,
            "{name}: {verified} processed insns, budget {VERIFIED_BUDGET}"
        );
        assert!(
            xlated < XLATED_BUDGET,
            "{name}: {xlated} bytes xlated, budget {XLATED_BUDGET}"
        );
    }
}
