use std::net::{SocketAddr, TcpListener};

pub struct Args {
    pub listen: u16,
    pub upstream: SocketAddr,
    pub mode: String,
    pub entries: u32,
}

pub fn args() -> Args {
    let mut a = std::env::args().skip(1);
    let (mut listen, mut upstream, mut mode, mut entries) =
        (None, None, String::from("plain"), 4096u32);
    while let Some(k) = a.next() {
        let v = a.next().expect("missing value");
        match k.as_str() {
            "--listen" => listen = Some(v.parse().unwrap()),
            "--upstream" => {
                use std::net::ToSocketAddrs;
                upstream = Some(v.to_socket_addrs().unwrap().next().unwrap())
            }
            "--mode" => mode = v,
            "--entries" => entries = v.parse().unwrap(),
            _ => panic!("unknown arg {k}"),
        }
    }
    Args {
        listen: listen.expect("--listen"),
        upstream: upstream.expect("--upstream"),
        mode,
        entries,
    }
}

pub fn listener(port: u16) -> TcpListener {
    TcpListener::bind(("127.0.0.1", port)).expect("bind")
}

pub fn nodelay(fd: i32) {
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const _ as *const _,
            4,
        );
    }
}

/// Pushes every entry of `pending` (submitting as the queue fills) and clears it, then submits
/// and waits for at least one completion: one `io_uring_enter` a turn when the queue has room.
pub fn submit_and_wait(ring: &mut io_uring::IoUring, pending: &mut Vec<io_uring::squeue::Entry>) {
    let mut i = 0;
    while i < pending.len() {
        {
            let mut sq = ring.submission();
            while i < pending.len() {
                // SAFETY: every entry's buffers live as long as the relay that queued them.
                if unsafe { sq.push(&pending[i]) }.is_err() {
                    break;
                }
                i += 1;
            }
        }
        if i < pending.len() {
            ring.submit().expect("submit");
        }
    }
    pending.clear();
    match ring.submit_and_wait(1) {
        Ok(_) => {}
        Err(e)
            if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {}
        Err(e) => panic!("submit_and_wait: {e}"),
    }
}

/// The upstream's connection for a client just accepted (`client`, Nagle off here): a
/// blocking connect (setup only, on loopback), then non-blocking if asked (epoll's; io_uring's
/// stay blocking, as measured); `None` (the client closed) if it cannot be made.
pub fn upstream_for(client: i32, upstream: SocketAddr, nonblocking: bool) -> Option<i32> {
    nodelay(client);
    match std::net::TcpStream::connect(upstream) {
        Ok(u) => {
            u.set_nonblocking(nonblocking).unwrap();
            u.set_nodelay(true).unwrap();
            Some(std::os::fd::IntoRawFd::into_raw_fd(u))
        }
        Err(_) => {
            // SAFETY: `client` is ours, accepted and not yet handed anywhere.
            unsafe { libc::close(client) };
            None
        }
    }
}

/// Puts `item` in a free slot of `slots` (one `free` names), else a new one: its index.
pub fn place<T>(slots: &mut Vec<T>, free: &mut Vec<usize>, item: T) -> usize {
    if let Some(i) = free.pop() {
        slots[i] = item;
        i
    } else {
        slots.push(item);
        slots.len() - 1
    }
}

/// Closes both sockets of a relayed pair.
pub fn close_pair(fd: [i32; 2]) {
    // SAFETY: the pair's descriptors are ours, and closed once (its slot is freed after).
    unsafe {
        libc::close(fd[0]);
        libc::close(fd[1]);
    }
}

/// An accept on `listener`, its completion tagged `tag`.
pub fn accept_entry(listener: i32, tag: u64) -> io_uring::squeue::Entry {
    use io_uring::{opcode, types};
    opcode::Accept::new(
        types::Fd(listener),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .build()
    .user_data(tag)
}
