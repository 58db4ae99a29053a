// io_uring byte relay: one recv outstanding per socket; on completion, send those bytes to
// the other socket; re-arm the recv when the send completed (short sends resubmitted).
// All SQEs produced by one batch of completions go out in the next submit_and_wait(1).
// --mode plain | coop | defer | sqpoll | defer-fixed (registered files)
use io_uring::{opcode, squeue, types, IoUring};
use relayfloor::*;
use std::os::fd::AsRawFd;

const BUF: usize = 16384;
const ACCEPT: u64 = u64::MAX;
// user_data: idx << 3 | side << 1 | op (op 0 = recv, 1 = send)

struct Dir {
    buf: Box<[u8; BUF]>,
    off: usize,
    len: usize,
    busy: bool, // an op (recv or send) is outstanding for this direction
}
struct Pair {
    fd: [i32; 2],
    d: [Dir; 2], // d[s]: recv from side s, send to side 1-s
    closing: bool,
    live: bool,
}

fn main() {
    let a = args();
    let mode = a.mode.as_str();
    let mut b = IoUring::builder();
    match mode {
        "plain" => {}
        "coop" => {
            b.setup_coop_taskrun().setup_single_issuer();
        }
        "defer" | "defer-fixed" | "defer-pf" => {
            b.setup_single_issuer().setup_defer_taskrun();
        }
        "sqpoll" => {
            b.setup_sqpoll(2000).setup_single_issuer();
        }
        _ => panic!("mode"),
    }
    let mut ring: IoUring = b.build(a.entries).expect("io_uring setup");
    let fixed = mode == "defer-fixed";
    let poll_first = mode == "defer-pf";
    const NFIX: u32 = 4096;
    if fixed {
        ring.submitter()
            .register_files_sparse(NFIX)
            .expect("register files");
    }
    let l = listener(a.listen);
    let lfd = l.as_raw_fd();
    let mut pairs: Vec<Pair> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut pending: Vec<squeue::Entry> = Vec::with_capacity(1024);
    pending.push(accept_entry(lfd, ACCEPT));

    macro_rules! fd_of {
        ($p:expr, $s:expr, $idx:expr) => {
            if fixed {
                types::Fixed(($idx * 2 + $s) as u32)
            } else {
                types::Fixed(0)
            }
        };
    }
    let _ = |_: usize| 0; // silence
    fn recv_sqe(p: &mut Pair, idx: usize, s: usize, fixed: bool, pf: bool) -> squeue::Entry {
        let d = &mut p.d[s];
        d.busy = true;
        let ud = ((idx as u64) << 3) | ((s as u64) << 1);
        let mut op = if fixed {
            opcode::Recv::new(
                types::Fixed((idx * 2 + s) as u32),
                d.buf.as_mut_ptr(),
                BUF as u32,
            )
        } else {
            opcode::Recv::new(types::Fd(p.fd[s]), d.buf.as_mut_ptr(), BUF as u32)
        };
        if pf {
            op = op.ioprio(1);
        } // IORING_RECVSEND_POLL_FIRST
        op.build().user_data(ud)
    }
    fn send_sqe(p: &mut Pair, idx: usize, s: usize, fixed: bool) -> squeue::Entry {
        let t = 1 - s;
        let d = &mut p.d[s];
        d.busy = true;
        let ud = ((idx as u64) << 3) | ((s as u64) << 1) | 1;
        let ptr = unsafe { d.buf.as_ptr().add(d.off) };
        let n = (d.len - d.off) as u32;
        let op = if fixed {
            opcode::Send::new(types::Fixed((idx * 2 + t) as u32), ptr, n)
        } else {
            opcode::Send::new(types::Fd(p.fd[t]), ptr, n)
        };
        op.flags(libc::MSG_NOSIGNAL).build().user_data(ud)
    }
    let _ = fd_of!(0, 0, 0usize);

    loop {
        submit_and_wait(&mut ring, &mut pending);
        let cqes: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut to_free: Vec<usize> = Vec::new();
        for (ud, res) in cqes {
            if ud == ACCEPT {
                pending.push(accept_entry(lfd, ACCEPT));
                if res < 0 {
                    continue;
                }
                let c = res;
                let Some(ufd) = upstream_for(c, a.upstream, false) else {
                    continue;
                };
                let p = Pair {
                    fd: [c, ufd],
                    d: [
                        Dir {
                            buf: Box::new([0; BUF]),
                            off: 0,
                            len: 0,
                            busy: false,
                        },
                        Dir {
                            buf: Box::new([0; BUF]),
                            off: 0,
                            len: 0,
                            busy: false,
                        },
                    ],
                    closing: false,
                    live: true,
                };
                let idx = place(&mut pairs, &mut free, p);
                if fixed {
                    assert!(((idx * 2 + 1) as u32) < NFIX);
                    ring.submitter()
                        .register_files_update((idx * 2) as u32, &[c, ufd])
                        .expect("update files");
                }
                let p = &mut pairs[idx];
                pending.push(recv_sqe(p, idx, 0, fixed, poll_first));
                pending.push(recv_sqe(p, idx, 1, fixed, poll_first));
                continue;
            }
            let idx = (ud >> 3) as usize;
            let s = ((ud >> 1) & 1) as usize;
            let is_send = ud & 1 == 1;
            let p = &mut pairs[idx];
            p.d[s].busy = false;
            let mut fail = res <= 0;
            if !fail && !p.closing {
                if is_send {
                    p.d[s].off += res as usize;
                    if p.d[s].off < p.d[s].len {
                        pending.push(send_sqe(p, idx, s, fixed));
                    } else {
                        p.d[s].off = 0;
                        p.d[s].len = 0;
                        pending.push(recv_sqe(p, idx, s, fixed, poll_first));
                    }
                } else {
                    p.d[s].off = 0;
                    p.d[s].len = res as usize;
                    pending.push(send_sqe(p, idx, s, fixed));
                }
            } else {
                fail = true;
            }
            if fail {
                if !p.closing {
                    p.closing = true;
                    // wake the other outstanding op(s)
                    unsafe {
                        libc::shutdown(p.fd[0], libc::SHUT_RDWR);
                        libc::shutdown(p.fd[1], libc::SHUT_RDWR);
                    }
                }
                if !p.d[0].busy && !p.d[1].busy && p.live {
                    p.live = false;
                    close_pair(p.fd);
                    to_free.push(idx);
                }
            }
        }
        free.extend(to_free);
    }
}
